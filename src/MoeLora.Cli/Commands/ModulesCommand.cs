using System.Globalization;
using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
using MoeLora.Core.Modules;
using Spectre.Console;
using Spectre.Console.Cli;

namespace MoeLora.Cli.Commands;

/// <summary><c>moelora modules [MODEL]</c>: named_modules() and named_parameters() as transformers would build them.</summary>
public sealed class ModulesCommand : Command<ModulesCommand.Settings>
{
    public sealed class Settings : ModelSettings;

    public override int Execute(CommandContext context, Settings settings, CancellationToken cancellationToken)
    {
        var format = settings.ParsedFormat;
        var (spec, _) = ModelLoader.Load(settings.Model, settings.ParsedLayout, settings.Revision);
        var tree = spec.Tree;
        if (format == "json")
        {
            Output.Json(ToJson(tree), settings.Output);
            return ExitCodes.Ok;
        }
        var table = new Table().Border(TableBorder.Simple).AddColumn("module").AddColumn("class").AddColumn("location")
            .AddColumn("parameters");
        foreach (var m in tree.Modules)
        {
            var ps = string.Join(", ", m.Parameters.Select(p => $"{p.LocalName} {p.ShapeText}" + (p.IsTied ? $" (tied to {p.TiedTo})" : "")));
            table.AddRow(Markup.Escape(m.Name.Length == 0 ? "(root)" : m.Name), Markup.Escape(m.ClassName), m.Location.Name(), Markup.Escape(ps));
        }
        var summary = new Markup($"{tree.Modules.Count.ToString(CultureInfo.InvariantCulture)} modules, {tree.Parameters.Count.ToString(CultureInfo.InvariantCulture)} parameters, {tree.NumParameters.ToString("N0", CultureInfo.InvariantCulture)} elements\n");
        Output.Renderables([table, summary], settings.Output);
        return ExitCodes.Ok;
    }

    /// <summary>The documented contract: <c>{"modules": [[name, class], ...], "parameters": [[name, shape], ...]}</c>.</summary>
    public static JsonObject ToJson(ModuleTree tree) => new()
    {
        ["modules"] = new JsonArray(tree.Modules.Select(m => (JsonNode)new JsonArray(m.Name, m.ClassName)).ToArray()),
        ["parameters"] = new JsonArray(tree.Parameters.Select(p => (JsonNode)new JsonArray(
            p.Name, new JsonArray(p.Shape.Select(s => (JsonNode)JsonValue.Create(s)).ToArray()))).ToArray()),
        ["num_parameters"] = tree.NumParameters,
    };
}
