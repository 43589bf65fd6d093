using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
using MoeLora.Core.Analysis;
using MoeLora.Sources.Analysis;
using Spectre.Console;
using Spectre.Console.Rendering;

namespace MoeLora.Cli.Rendering;

/// <summary>The report section about the checkpoint on disk: cross-check against the analysis, dtypes, size.</summary>
public static class CheckpointSection
{
    private const int Shown = 8;

    public static JsonObject? ToJson(LoadedModel loaded)
    {
        if (loaded.Derived is { } d)
        {
            return new JsonObject
            {
                ["derived"] = true,
                ["label"] = DerivedModel.Label,
                ["notes"] = new JsonArray(d.Notes.Select(n => (JsonNode)JsonValue.Create(n)).ToArray()),
            };
        }
        if (loaded.CheckpointError is { } error) return new JsonObject { ["derived"] = false, ["clean"] = false, ["error"] = error };
        if (loaded.CrossCheck is not { } c) return null;
        return new JsonObject
        {
            ["derived"] = false,
            ["clean"] = c.IsClean,
            ["files"] = c.FileCount,
            ["size_on_disk_bytes"] = c.SizeOnDisk,
            ["dtypes"] = new JsonObject(c.Dtypes.Select(t => KeyValuePair.Create(t.Dtype.ToString(), (JsonNode?)new JsonObject { ["elements"] = t.Elements, ["bytes"] = t.Bytes }))),
            ["problems"] = new JsonArray(c.Problems.Select(p => (JsonNode)new JsonObject
            {
                ["name"] = p.Name,
                ["status"] = p.Status.ToString(),
                ["detail"] = p.Detail,
            }).ToArray()),
            ["unexpected"] = new JsonArray(c.Unexpected.Select(t => (JsonNode)JsonValue.Create(t.Name)).ToArray()),
            ["buffers"] = new JsonArray(c.NotParameters.Select(t => (JsonNode)JsonValue.Create(t.Name)).ToArray()),
        };
    }

    public static IEnumerable<IRenderable> Render(LoadedModel loaded)
    {
        if (loaded.Derived is { } d)
        {
            yield return new Rule("[bold yellow]Derived from checkpoint headers[/]").LeftJustified();
            foreach (var n in d.Notes) yield return new Markup($"[yellow]![/] {Markup.Escape(n)}\n");
            yield break;
        }
        if (loaded.CheckpointError is { } error)
        {
            yield return new Rule("[bold]Checkpoint[/]").LeftJustified();
            yield return new Markup($"[red]![/] {Markup.Escape("The checkpoint could not be read: " + error)}\n");
            yield break;
        }
        if (loaded.CrossCheck is not { } c) yield break;
        yield return new Rule("[bold]Checkpoint[/]").LeftJustified();
        var dtypes = string.Join(", ", c.Dtypes.Select(t => $"{t.Dtype} {Units.Bytes(t.Bytes)}"));
        yield return new Markup(Markup.Escape($"{c.FileCount} file(s), {Units.Bytes(c.SizeOnDisk)} on disk ({dtypes}).") + "\n");
        if (c.IsClean)
        {
            yield return new Markup("[green]Every parameter of the analysis is stored with the expected shape.[/]\n");
            yield break;
        }
        foreach (var p in c.Problems.Take(Shown)) yield return new Markup($"[red]![/] {Markup.Escape($"{p.Name}: {p.Status} {p.Detail}")}\n");
        if (c.Problems.Count > Shown) yield return new Markup($"… and {c.Problems.Count - Shown} more parameters disagree\n");
        foreach (var t in c.Unexpected.Take(Shown)) yield return new Markup($"[yellow]?[/] {Markup.Escape($"{t.Name} is stored but belongs to no module of the analysis")}\n");
        if (c.Unexpected.Count > Shown) yield return new Markup($"… and {c.Unexpected.Count - Shown} more unexpected tensors\n");
    }
}
