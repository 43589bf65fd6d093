using MoeLora.Torch.Models.Families;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Models;

/// <summary>Builds models from config.json, with weights from a checkpoint directory or seeded random init.</summary>
public static class TorchModelFactory
{
    static readonly Dictionary<string, IModelFamily> Families = new IModelFamily[]
    {
        new Llama(), new Qwen2(), new Mistral(), new Qwen3(), new Mixtral(), new Qwen2Moe(), new Qwen3Moe(), new Olmoe(),
        new Llama4Text(), new DeepseekV3(), new GptOss(),
    }.ToDictionary(f => f.ModelType);

    public static IReadOnlyCollection<string> SupportedModelTypes => Families.Keys;

    /// <summary>Loads config.json + Hub checkpoint from <paramref name="checkpointDir"/>.</summary>
    public static CausalLm Load(string checkpointDir, ScalarType dtype = ScalarType.Float32, Device? device = null) =>
        Load(File.ReadAllText(Path.Combine(checkpointDir, "config.json")), checkpointDir, dtype, device);

    public static CausalLm Load(string configJson, string checkpointDir, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        TorchRuntime.EnsureInitialized();
        CheckDType(dtype);
        var config = ModelConfig.Parse(configJson);
        var family = Family(config);
        CheckpointLoader.Files(checkpointDir); // fail on missing shards before building anything
        var model = family.Build(config, new Init(dtype, device ?? CPU, config.InitializerRange, null));
        var tensors = CheckpointLoader.LoadRuntime(checkpointDir, family);
        try { CheckpointLoader.Apply(model, tensors); }
        finally { foreach (var t in tensors.Values) t.Dispose(); }
        return model;
    }

    /// <summary>
    /// Loads only decoder blocks 0..<paramref name="numLayers"/>-1 (config.num_hidden_layers = numLayers), as the
    /// circuit-breaker reference truncates the model to max(target_layers)+1 blocks; the final norm and lm_head are kept.
    /// </summary>
    public static CausalLm LoadTruncated(string checkpointDir, int numLayers, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        TorchRuntime.EnsureInitialized();
        CheckDType(dtype);
        var configJson = TruncateConfig(File.ReadAllText(Path.Combine(checkpointDir, "config.json")), numLayers);
        var config = ModelConfig.Parse(configJson);
        var family = Family(config);
        CheckpointLoader.Files(checkpointDir);
        var model = family.Build(config, new Init(dtype, device ?? CPU, config.InitializerRange, null));
        var tensors = CheckpointLoader.LoadRuntime(checkpointDir, family);
        try
        {
            var layer = new System.Text.RegularExpressions.Regex(@"^model\.layers\.(\d+)\.");
            foreach (var k in tensors.Keys.ToList())
                if (layer.Match(k) is { Success: true } m && int.Parse(m.Groups[1].Value) >= numLayers) { tensors[k].Dispose(); tensors.Remove(k); }
            CheckpointLoader.Apply(model, tensors);
        }
        finally { foreach (var t in tensors.Values) t.Dispose(); }
        return model;
    }

    /// <summary>config.json with num_hidden_layers set to <paramref name="numLayers"/> (per-layer lists cut to match).</summary>
    public static string TruncateConfig(string configJson, int numLayers)
    {
        var o = System.Text.Json.Nodes.JsonNode.Parse(configJson)!.AsObject();
        long total = (long)o["num_hidden_layers"]!.GetValue<double>();
        if (numLayers < 1 || numLayers > total)
            throw new ArgumentException($"cannot truncate to {numLayers} layers: the model has {total} (num_hidden_layers).");
        o["num_hidden_layers"] = numLayers;
        if (o["layer_types"] is System.Text.Json.Nodes.JsonArray lt && lt.Count > numLayers)
            o["layer_types"] = new System.Text.Json.Nodes.JsonArray(lt.Take(numLayers).Select(x => x!.DeepClone()).ToArray());
        return o.ToJsonString();
    }

    /// <summary>Seeded random weights: normal(0, initializer_range) for matrices, ones for norms, zeros for biases.</summary>
    public static CausalLm Random(string configJson, long seed, ScalarType dtype = ScalarType.Float32, Device? device = null)
    {
        TorchRuntime.EnsureInitialized();
        CheckDType(dtype);
        var config = ModelConfig.Parse(configJson);
        var gen = new Generator((ulong)seed);
        return Family(config).Build(config, new Init(dtype, device ?? CPU, config.InitializerRange, gen));
    }

    internal static IModelFamily FamilyFor(string configJson) => Family(ModelConfig.Parse(configJson));

    static IModelFamily Family(ModelConfig c) =>
        Families.TryGetValue(c.ModelType, out var f) ? f
            : throw new NotSupportedException($"model_type '{c.ModelType}' is not supported (supported: {string.Join(", ", Families.Keys)}).");

    static void CheckDType(ScalarType t)
    {
        if (t is not (ScalarType.Float32 or ScalarType.BFloat16 or ScalarType.Float16 or ScalarType.Float64))
            throw new ArgumentException($"Unsupported model dtype {t}; use float32, bfloat16 or float16.");
    }
}
