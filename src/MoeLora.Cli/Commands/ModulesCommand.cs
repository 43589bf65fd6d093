using System.Globalization;
using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Rendering;
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
        var (spec, _) = ModelLoader.Load(settings.Model, settings.Layout, settings.Revision);
        var tree = spec.Tree;
        Output.Result(settings.Format, settings.Output, () => ToJson(tree), () => Text(tree), () => Markdown(tree));
        return ExitCodes.Ok;
    }

    private static string Parameters(ModuleNode m) =>
        string.Join(", ", m.Parameters.Select(p => $"{p.LocalName} {p.ShapeText}" + (p.IsTied ? $" (tied to {p.TiedTo})" : "")));

    private static string Summary(ModuleTree tree) =>
        $"{tree.Modules.Count.ToString(CultureInfo.InvariantCulture)} modules, {tree.Parameters.Count.ToString(CultureInfo.InvariantCulture)} parameters, {tree.NumParameters.ToString("N0", CultureInfo.InvariantCulture)} elements";

    private static IEnumerable<Spectre.Console.Rendering.IRenderable> Text(ModuleTree tree)
    {
        var table = FitTable.Plain(["module", "class", "location", "parameters"],
            tree.Modules.Select(m => (IReadOnlyList<string>)[m.Name.Length == 0 ? "(root)" : m.Name, m.ClassName, m.Location.Name(), Parameters(m)]),
            TableBorder.Simple);
        return [table, new Markup(Markup.Escape(Summary(tree)) + "\n")];
    }

    private static string Markdown(ModuleTree tree) =>
        MarkdownTable.Render(["module", "class", "location", "parameters"],
            tree.Modules.Select(m => (IReadOnlyList<string>)[m.Name.Length == 0 ? "(root)" : "`" + m.Name + "`", m.ClassName, m.Location.Name(), Parameters(m)]))
        + "\n" + Summary(tree) + "\n";

    /// <summary>The documented contract: <c>{"modules": [[name, class], ...], "parameters": [[name, shape], ...]}</c>.</summary>
    public static JsonObject ToJson(ModuleTree tree) => new()
    {
        ["modules"] = new JsonArray(tree.Modules.Select(m => (JsonNode)new JsonArray(m.Name, m.ClassName)).ToArray()),
        ["parameters"] = new JsonArray(tree.Parameters.Select(p => (JsonNode)new JsonArray(
            p.Name, new JsonArray(p.Shape.Select(s => (JsonNode)JsonValue.Create(s)).ToArray()))).ToArray()),
        ["num_parameters"] = tree.NumParameters,
    };
}
