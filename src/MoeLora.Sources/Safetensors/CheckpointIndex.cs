using System.Text.Json;

namespace MoeLora.Sources.Safetensors;

/// <summary>A parsed <c>model.safetensors.index.json</c>: which shard holds each tensor.</summary>
/// <param name="WeightMap">Tensor name to shard file name, relative to the index.</param>
/// <param name="TotalSize">The index's <c>metadata.total_size</c>: bytes of tensor data (not parameters), when present.</param>
public sealed record CheckpointIndex(IReadOnlyDictionary<string, string> WeightMap, long? TotalSize)
{
    public const string FileName = "model.safetensors.index.json";

    /// <summary>Shard file names in first-seen order.</summary>
    public IReadOnlyList<string> Shards => WeightMap.Values.Distinct(StringComparer.Ordinal).ToList();

    public static CheckpointIndex Parse(string json, string source)
    {
        try
        {
            using JsonDocument document = JsonDocument.Parse(json);
            JsonElement root = document.RootElement;
            if (root.ValueKind != JsonValueKind.Object || !root.TryGetProperty("weight_map", out JsonElement map) || map.ValueKind != JsonValueKind.Object)
                throw Error(source, "it has no \"weight_map\" object");

            var weights = new Dictionary<string, string>(StringComparer.Ordinal);
            foreach (JsonProperty entry in map.EnumerateObject())
            {
                if (entry.Value.ValueKind != JsonValueKind.String)
                    throw Error(source, $"weight_map entry '{entry.Name}' is not a file name");
                string shard = entry.Value.GetString()!;
                if (!IsSafeRelativeName(shard))
                    throw Error(source, $"weight_map entry '{entry.Name}' points outside the model folder ('{shard}')");
                if (!weights.TryAdd(entry.Name, shard))
                    throw Error(source, $"tensor '{entry.Name}' is listed twice");
            }

            long? total = null;
            if (root.TryGetProperty("metadata", out JsonElement metadata) && metadata.ValueKind == JsonValueKind.Object
                && metadata.TryGetProperty("total_size", out JsonElement size) && size.ValueKind == JsonValueKind.Number)
            {
                // Some exporters write a float here; only a whole, non-negative number is meaningful.
                if (size.TryGetInt64(out long whole) && whole >= 0) total = whole;
                else if (size.TryGetDouble(out double approx) && approx >= 0 && approx < long.MaxValue) total = (long)approx;
            }
            return new CheckpointIndex(weights, total);
        }
        catch (JsonException ex)
        {
            throw Error(source, $"it is not valid JSON ({ex.Message.Split('\n')[0]})");
        }
    }

    // Shard names come from a downloaded file and become paths and URLs: refuse anything that could escape the folder.
    internal static bool IsSafeRelativeName(string name) =>
        name.Length > 0
        && !name.StartsWith('/')
        && !name.Contains('\\', StringComparison.Ordinal)
        && !name.Contains(':', StringComparison.Ordinal)
        && name.Split('/').All(part => part.Length > 0 && part != "." && part != "..");

    private static SafetensorsFormatException Error(string source, string problem) =>
        new($"{source} is not a valid safetensors index: {problem}.");
}
