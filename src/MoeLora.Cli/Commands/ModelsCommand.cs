using System.ComponentModel;
using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Rendering;
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
    public sealed class Settings : ResultSettings;

    /// <summary>Builds a catalog model, or null when its model_type is not supported by this build.</summary>
    private static ModelSpec? TryBuild(CatalogEntry e)
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
        Output.Result(settings.Format, settings.Output, () => ToJson(rows), () => [Table(rows)], () => Markdown(rows));
        return ExitCodes.Ok;
    }

    private static JsonObject ToJson(IEnumerable<(CatalogEntry Entry, ModelSpec? Spec)> rows) => new()
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
    };

    private static string Experts(ModelSpec s) => s.Moe.IsMoe ? $"{s.Moe.NumExperts} (top-{s.Moe.ExpertsPerToken})" : "dense";

    private static string Markdown(IEnumerable<(CatalogEntry Entry, ModelSpec? Spec)> rows) =>
        MarkdownTable.Render(["id", "model_type", "parameters", "experts", "note"], rows.Select(r => (IReadOnlyList<string>)(r.Spec is not { } s
            ? [r.Entry.Id, "unsupported", "", "", ""]
            : [r.Entry.Id, s.ModelType, $"{s.Tree.NumParameters / 1e9:0.00} B", Experts(s), r.Entry.Partial ? "partial: " + r.Entry.Note : ""])));

    private static FitTable Table(IEnumerable<(CatalogEntry Entry, ModelSpec? Spec)> rows) =>
        new([new("id"), new("model_type"), new("parameters", Right: true), new("experts"), new("note")],
            rows.Select(r => (IReadOnlyList<string>)(r.Spec is not { } s
                ? [Markup.Escape(r.Entry.Id), "[red]unsupported[/]", "", "", ""]
                : [Markup.Escape(r.Entry.Id), Markup.Escape(s.ModelType), $"{s.Tree.NumParameters / 1e9:0.00} B", Experts(s),
                    r.Entry.Partial ? $"[yellow]partial:[/] {Markup.Escape(r.Entry.Note ?? "")}" : ""])));
}
