using MoeLora.Core.Architectures;
using MoeLora.Core.Modules;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;
using CoreConfig = MoeLora.Core.Config.ModelConfig;
using MoeLora.Core;

namespace MoeLora.Torch.Models;

/// <summary>
/// Builds models from config.json through Core's <see cref="ModelSpec"/> (the family's config reading and runtime
/// settings), with weights from a checkpoint directory or seeded random init.
/// </summary>
public static class TorchModelFactory
{
    /// <summary>Core's transformers-5 spec of a config.json; unknown model types are one-line <see cref="Core.Config.ConfigException"/>s.</summary>
    public static ModelSpec Spec(string configJson) =>
        ArchitectureRegistry.Build(CoreConfig.Parse(configJson, "config.json"), Layout.V5);

    /// <summary>Loads config.json + Hub checkpoint from <paramref name="checkpointDir"/>.</summary>
    public static CausalLm Load(string checkpointDir, ScalarType dtype = ScalarType.Float32, Device? device = null) =>
        Load(File.ReadAllText(Path.Combine(checkpointDir, "config.json")), checkpointDir, dtype, device);

    /// <param name="progress">Called after each stored tensor is on the device (e.g. for a progress bar).</param>
    public static CausalLm Load(string configJson, string checkpointDir, ScalarType dtype = ScalarType.Float32, Device? device = null,
        Action<LoadProgress>? progress = null) =>
        LoadWith(configJson, checkpointDir, dtype, device, truncated: false, progress);

    /// <summary>
    /// Loads only decoder blocks 0..<paramref name="numLayers"/>-1 (config.num_hidden_layers = numLayers), as the
    /// circuit-breaker reference truncates the model to max(target_layers)+1 blocks; the final norm and lm_head are kept.
    /// </summary>
    public static CausalLm LoadTruncated(string checkpointDir, int numLayers, ScalarType dtype = ScalarType.Float32, Device? device = null,
        Action<LoadProgress>? progress = null) =>
        LoadWith(TruncateConfig(File.ReadAllText(Path.Combine(checkpointDir, "config.json")), numLayers), checkpointDir, dtype, device, truncated: true, progress);

    static CausalLm LoadWith(string configJson, string checkpointDir, ScalarType dtype, Device? device, bool truncated, Action<LoadProgress>? progress)
    {
        TorchRuntime.EnsureInitialized();
        CheckDType(dtype);
        var spec = Spec(configJson);
        spec.RequireRuntime();
        CheckpointLoader.Files(checkpointDir); // fail on missing shards before building anything
        var model = ModelBuilder.Build(spec, new Init(dtype, device ?? CPU, spec.Runtime!.InitializerRange, null));
        try { CheckpointLoader.LoadInto(model, checkpointDir, skipDeeperLayers: truncated, progress); }
        catch { model.Dispose(); throw; }
        return model;
    }

    /// <summary>
    /// config.json with num_hidden_layers set to <paramref name="numLayers"/> (per-layer lists cut to match). A multimodal
    /// config without a top-level count (Llama 4, Aria, MiniMax-M3-VL) is cut in its text_config: the towers keep theirs.
    /// </summary>
    public static string TruncateConfig(string configJson, int numLayers)
    {
        var root = System.Text.Json.Nodes.JsonNode.Parse(configJson)!.AsObject();
        var o = root["num_hidden_layers"] is null && root["n_layers"] is null && root["layers_block_type"] is null
            && root["text_config"] is System.Text.Json.Nodes.JsonObject text ? text : root;
        // Nemotron-H has no num_hidden_layers: its layer count is the length of layers_block_type.
        var blockTypes = o["layers_block_type"] as System.Text.Json.Nodes.JsonArray;
        // DBRX names the count n_layers.
        var key = o["num_hidden_layers"] is null && o["n_layers"] is not null ? "n_layers" : "num_hidden_layers";
        long total = o[key] is { } n ? (long)n.GetValue<double>()
            : blockTypes?.Count ?? throw new UserInputException("cannot truncate the model: config.json has no num_hidden_layers.");
        if (numLayers < 1 || numLayers > total)
            throw new UserInputException($"cannot truncate to {numLayers} layers: the model has {total} ({key}).");
        if (o[key] is not null) o[key] = numLayers;
        foreach (var perLayer in new[] { "layer_types", "layers_block_type" })
            if (o[perLayer] is System.Text.Json.Nodes.JsonArray lt && lt.Count > numLayers)
                o[perLayer] = new System.Text.Json.Nodes.JsonArray(lt.Take(numLayers).Select(x => x!.DeepClone()).ToArray());
        return root.ToJsonString();
    }

    /// <summary>
    /// Seeded random weights: normal(0, initializer_range) for matrices, ones for norms, zeros for biases.
    /// <see cref="RandomInit.Portable"/> draws on the CPU (the same weights on every device, one tensor at a time);
    /// <see cref="RandomInit.OnDevice"/> draws on the target device in the target dtype (fast, nothing staged on the host,
    /// values depend on the device's generator).
    /// </summary>
    public static CausalLm Random(string configJson, long seed, ScalarType dtype = ScalarType.Float32, Device? device = null,
        RandomInit mode = RandomInit.Portable)
    {
        TorchRuntime.EnsureInitialized();
        CheckDType(dtype);
        var spec = Spec(configJson);
        var target = device ?? CPU;
        // TorchSharp 0.107's Generator(seed, device) still makes a CPU generator, which CUDA kernels reject ("Expected
        // a 'cuda' device type for generator", seen on the H100), so a CUDA draw seeds the device's default generator.
        if (mode == RandomInit.OnDevice && target.type == DeviceType.CUDA) torch.cuda.manual_seed(seed);
        var gen = new Generator((ulong)seed);
        return ModelBuilder.Build(spec, new Init(dtype, target, spec.RequireRuntime().InitializerRange, gen) { DrawOnDevice = mode == RandomInit.OnDevice });
    }

    static void CheckDType(ScalarType t)
    {
        if (t is not (ScalarType.Float32 or ScalarType.BFloat16 or ScalarType.Float16 or ScalarType.Float64))
            throw new UserInputException($"Unsupported model dtype {t}; use float32, bfloat16 or float16.");
    }
}

/// <summary>Where seeded random weights are drawn.</summary>
public enum RandomInit
{
    /// <summary>On the CPU in fp32, then cast and moved: identical weights on every device (tests, the tiny preset).</summary>
    Portable,
    /// <summary>On the target device in the target dtype: real-size models build in seconds with no host copy.</summary>
    OnDevice,
}
