using System.ComponentModel;
using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
using MoeLora.Core.Architectures;
using MoeLora.Core.Catalog;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using Spectre.Console;
using Spectre.Console.Cli;
using MoeLora.Core;

namespace MoeLora.Cli.Commands;

/// <summary><c>moelora models</c>: the embedded catalog, with each model's type and size.</summary>
public sealed class ModelsCommand : Command<ModelsCommand.Settings>
{
    public sealed class Settings : CommandSettings
    {
        [CommandOption("--format <FORMAT>")]
        [Description("text or json")]
        public string Format { get; init; } = "text";

        public override Spectre.Console.ValidationResult Validate() => OptionChecks.First(OptionChecks.OneOf(Format, "--format", true, "text", "json"));
    }

    /// <summary>Builds a catalog model, or null when its model_type is not supported by this build.</summary>
    private static Core.Architectures.ModelSpec? TryBuild(CatalogEntry e)
    {
        try
        {
            return ArchitectureRegistry.Build(new ModelConfig(ModelCatalog.TryGetConfig(e.Id)!), MoeLora.Core.Modules.Layout.V5);
        }
        catch (ConfigException)
        {
            return null;
        }
    }

    public override int Execute(CommandContext context, Settings settings, CancellationToken cancellationToken)
    {
        var rows = ModelCatalog.Entries.Select(e => (Entry: e, Spec: TryBuild(e))).ToList();
        if (settings.Format.Equals("json", StringComparison.OrdinalIgnoreCase))
        {
            Output.Json(new JsonObject
            {
                ["models"] = new JsonArray(rows.Select(r => (JsonNode)new JsonObject
                {
                    ["id"] = r.Entry.Id,
                    ["model_type"] = r.Spec?.ModelType,
                    ["architecture"] = r.Spec?.Architecture,
                    ["num_parameters"] = r.Spec?.Tree.NumParameters,
                    ["is_moe"] = r.Spec?.Moe.IsMoe,
                    ["num_experts"] = r.Spec?.Moe.NumExperts,
                    ["experts_per_token"] = r.Spec?.Moe.ExpertsPerToken,
                    ["supported"] = r.Spec is not null,
                    ["partial"] = r.Entry.Partial,
                    ["note"] = r.Entry.Note,
                }).ToArray()),
            }, null);
            return ExitCodes.Ok;
        }
        if (!settings.Format.Equals("text", StringComparison.OrdinalIgnoreCase))
            throw new UserInputException($"unknown format '{settings.Format}': use text or json");
        var table = new Table().Border(TableBorder.Rounded).AddColumn("id").AddColumn("model_type").AddColumn(new TableColumn("parameters").RightAligned())
            .AddColumn("experts").AddColumn("note");
        foreach (var (e, s) in rows)
        {
            if (s is null)
            {
                table.AddRow(Markup.Escape(e.Id), "[red]unsupported[/]", "", "", "");
                continue;
            }
            table.AddRow(Markup.Escape(e.Id), s.ModelType, $"{s.Tree.NumParameters / 1e9:0.00} B",
                s.Moe.IsMoe ? $"{s.Moe.NumExperts} (top-{s.Moe.ExpertsPerToken})" : "dense",
                e.Partial ? $"[yellow]partial:[/] {Markup.Escape(e.Note ?? "")}" : "");
        }
        Consoles.Out.Write(table);
        return ExitCodes.Ok;
    }
}
