using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
using MoeLora.Core.Analysis;
using MoeLora.Sources.Analysis;

namespace MoeLora.Cli.Rendering;

/// <summary>The JSON form of the checkpoint check (the other views take it from <see cref="Document.ReportDocumentBuilder"/>).</summary>
public static class CheckpointJson
{
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
}
