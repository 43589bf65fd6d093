using System.IO.Compression;
using System.Text.Json.Nodes;

namespace MoeLora.Core.Tests.Support;

/// <summary>Reads the transformers 5.17 + peft 0.21 oracle files copied into Data/.</summary>
internal static class OracleData
{
    public static string DataDir => Path.Combine(AppContext.BaseDirectory, "Data");

    public static JsonObject ReadGz(string relativePath)
    {
        using var file = File.OpenRead(Path.Combine(DataDir, relativePath));
        using var gz = new GZipStream(file, CompressionMode.Decompress);
        return JsonNode.Parse(gz)!.AsObject();
    }

    /// <summary>The models with a full oracle file (org__name).</summary>
    public static IEnumerable<string> ModelKeys() =>
        Directory.GetFiles(Path.Combine(DataDir, "oracle"), "*__*.json.gz")
            .Select(f => Path.GetFileName(f)[..^".json.gz".Length])
            .Order(StringComparer.Ordinal);

    private static readonly Lazy<JsonObject> MoeTinyModels = new(() => ReadGz("oracle-moe/moe_tiny_models.json.gz")["models"]!.AsObject());

    /// <summary>A fresh copy of the tiny config the MoE oracle built for <paramref name="modelType"/>, edited by
    /// <paramref name="edit"/> (to derive a second config from it).</summary>
    public static JsonObject MoeTinyConfig(string modelType, Action<JsonObject> edit)
    {
        var config = MoeTinyModels.Value[modelType]!["input_config"]!.DeepClone().AsObject();
        edit(config);
        return config;
    }

    public static string HubId(string key) => key.Replace("__", "/", StringComparison.Ordinal);

    public static long[] Shape(JsonNode node) => node.AsArray().Select(x => x!.GetValue<long>()).ToArray();
}
