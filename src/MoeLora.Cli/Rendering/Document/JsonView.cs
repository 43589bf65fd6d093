using System.Text.Json.Nodes;

namespace MoeLora.Cli.Rendering.Document;

/// <summary>
/// The JSON view: the report's data in the <c>moelora.report/1</c> layout (numbers unformatted, for scripts), plus
/// <c>sections</c>, the document's sections in order with where each one's data sits (an additive key).
/// </summary>
public static class JsonView
{
    public static JsonObject Render(JsonObject data, ReportDocument document)
    {
        data["sections"] = new JsonArray(document.Sections.Select(s => (JsonNode)new JsonObject
        {
            ["id"] = s.Id,
            ["title"] = s.Title.Plain,
            ["json"] = s.Json,
        }).ToArray());
        return data;
    }

    /// <summary>The node at a dotted path such as <c>memory.training</c> (null when absent).</summary>
    public static JsonNode? At(JsonObject data, string path)
    {
        JsonNode? node = data;
        foreach (var key in path.Split('.')) node = node is JsonObject o && o.TryGetPropertyValue(key, out var next) ? next : null;
        return node;
    }
}
