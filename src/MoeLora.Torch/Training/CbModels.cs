using MoeLora.Torch.Text;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using TorchSharp;
using static TorchSharp.torch;
using MoeLora.Core;

namespace MoeLora.Torch.Training;

/// <summary>Loading the (truncated) base model, tokenizer and adapter for circuit-breaker training and evaluation.</summary>
public static class CbModels
{
    /// <summary>Blocks to keep: max(target)+1 (reference §4), unless <paramref name="fullLayers"/>.</summary>
    public static int TruncatedLayers(IReadOnlyList<int> targets, int modelLayers, bool fullLayers)
    {
        int max = targets.Max();
        if (targets.Any(t => t < 0 || t > modelLayers))
            throw new UserInputException($"--cb-target-layers must be hidden_states indices 0..{modelLayers} (0 = embeddings, {modelLayers} = final norm).");
        return fullLayers ? modelLayers : Math.Min(modelLayers, max + 1);
    }

    /// <summary>
    /// The base model with <paramref name="numLayers"/> blocks: from <paramref name="modelDir"/> (config.json + safetensors) or,
    /// when null, the tiny preset's random model (seed 0).
    /// </summary>
    /// <remarks>The tiny model is drawn on the CPU (<see cref="RandomInit.Portable"/>), so CPU and CUDA runs start from the same weights.</remarks>
    public static CausalLm Load(string? modelDir, int numLayers, ScalarType dtype, Device device, Action<LoadProgress>? progress = null) =>
        modelDir is null
            ? TorchModelFactory.Random(TorchModelFactory.TruncateConfig(TrainPreset.TinyConfigJson(), numLayers), 0, dtype, device)
            : TorchModelFactory.LoadTruncated(modelDir, numLayers, dtype, device, progress);

    public static int ModelLayers(string? modelDir) =>
        (int)TorchModelFactory.Spec(modelDir is null ? TrainPreset.TinyConfigJson() : File.ReadAllText(Path.Combine(modelDir, "config.json"))).NumHiddenLayers;

    public static string ModelType(string? modelDir) =>
        TorchModelFactory.Spec(modelDir is null ? TrainPreset.TinyConfigJson() : File.ReadAllText(Path.Combine(modelDir, "config.json"))).ModelType;

    public static HfTokenizer Tokenizer(string? modelDir) =>
        modelDir is null ? new HfTokenizer(TrainPreset.TinyTokenizerJson(), "the tiny preset's tokenizer") : HfTokenizer.Load(modelDir);

    /// <summary>
    /// Injects LoRA for a LoraConfig / adapter_config.json exactly as PEFT would: through Core's
    /// <see cref="LoraInjector.Plan(CausalLm, string, string)"/> (PEFT's matching and its transformers-5 rewrite, e.g.
    /// gate/up/down_proj → fused experts with doubled rank for gate_up_proj), so the saved adapter_config.json is PEFT's
    /// effective config and the saved tensors are the plan's.
    /// </summary>
    /// <param name="wholeModelConfigJson">
    /// config.json of the whole model when <paramref name="model"/> is truncated: the adapter is then saved with the
    /// whole model's tensors (see <see cref="InjectedAdapter.SavePlan"/>), so PEFT loads it on the whole model without
    /// missing keys.
    /// </param>
    public static InjectedAdapter InjectAdapter(CausalLm model, string loraConfigJson, long seed, string? baseModelNameOrPath = null,
        string? wholeModelConfigJson = null)
    {
        var adapter = LoraInjector.Inject(model, LoraInjector.Plan(model, loraConfigJson), seed: seed, baseModelNameOrPath: baseModelNameOrPath);
        if (wholeModelConfigJson is not null && TorchModelFactory.Spec(wholeModelConfigJson).NumHiddenLayers > model.NumLayers)
            adapter = adapter with { SavePlan = LoraInjector.Plan(wholeModelConfigJson, loraConfigJson) };
        return adapter;
    }

    /// <summary>Router parameters (2-D gate/router weights) of blocks in <paramref name="layers"/>, made trainable (--train-router).</summary>
    public static List<(string Name, Parameter Param)> UnfreezeRouters(CausalLm model)
    {
        var list = model.NamedParameters()
            .Where(p => p.Param.dim() == 2 && System.Text.RegularExpressions.Regex.IsMatch(p.Name, @"\.(mlp|feed_forward|block_sparse_moe)\.(gate|router)\.weight$"))
            .ToList();
        if (list.Count == 0) throw new UserInputException("--train-router: this model has no router weights (mlp.gate / mlp.router).");
        foreach (var (_, p) in list) p.requires_grad = true;
        return list;
    }

    /// <summary>
    /// Checks that LoRA did not land on a router (the reference keeps routing frozen); with <paramref name="allow"/> it may.
    /// </summary>
    public static void CheckRouterFrozen(InjectedAdapter adapter, bool allow)
    {
        if (allow) return;
        var hit = adapter.Wrappers.Select(w => w.Module).FirstOrDefault(m => System.Text.RegularExpressions.Regex.IsMatch(m, @"\.(gate|router|shared_expert_gate)$"));
        if (hit is not null)
            throw new UserInputException($"the LoRA targets adapt the router {hit}; routing stays frozen by default (pass --train-router to allow it).");
    }
}
