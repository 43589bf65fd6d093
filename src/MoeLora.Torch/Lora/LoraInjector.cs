using System.Text.Json.Nodes;
using MoeLora.Torch.IO;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using TorchSharp;
using static TorchSharp.torch;
using MoeLora.Core;

namespace MoeLora.Torch.Lora;

/// <summary>What one injection created, in PEFT's run-time names (<c>base_model.model.</c> prefix, adapter infix).</summary>
/// <param name="Plan">Core's plan the adapters were injected from (the single source of matching).</param>
/// <param name="ConfigJson">The adapter_config.json <see cref="LoraInjector.SavePeftAdapter"/> writes: the loaded file
/// as PEFT wrote it, or the plan's effective config for new adapters.</param>
public sealed record InjectedAdapter(string AdapterName, MoeLora.Core.Peft.AdapterPlan Plan, JsonObject ConfigJson,
    IReadOnlyList<(string Module, LoraWrapper Wrapper)> Wrappers)
{
    /// <summary>
    /// The plan of the whole model when a truncated one is trained (circuit breakers keep blocks 0..max target):
    /// PEFT on the whole model wraps the fused experts of every block (target_parameters ignore layers_to_transform),
    /// so the saved file must hold those blocks' expert LoRA too; they are written untrained (PEFT's init, B = 0).
    /// </summary>
    public MoeLora.Core.Peft.AdapterPlan? SavePlan { get; init; }
}

/// <summary>
/// PEFT 0.21's LoRA injection, driven by Core's <see cref="MoeLora.Core.Peft.AdapterPlan"/> (see LoraInjector.Plan.cs):
/// modules become <c>lora.Linear</c> wrappers (names gain <c>base_layer.</c>); parameters get nested
/// <c>ParamWrapper</c>s (for v5 experts: <c>experts.base_layer.lora_*</c> = gate_up_proj, <c>experts.lora_*</c> =
/// down_proj). Base weights stay frozen; only adapter weights require gradients. PEFT adapter folders load through
/// the same plan (their adapter_config.json parsed by Core's LoraConfig) and save with PEFT's keys.
/// </summary>
public static partial class LoraInjector
{
    public const string PeftPrefix = "base_model.model.";

    // PEFT: A, B are nn.Linear(in, r) / nn.Linear(r, out), fp32. init True: A kaiming-uniform(a=√5) = U(±1/√in), B = 0;
    // False: both keep nn.Linear's default U(±1/√fan_in); "gaussian": A ~ N(0, 1/r), B = 0.
    static (Tensor A, Tensor B) InitFactors(JsonNode? initLoraWeights, int r, int rows, long inF, long outF, Device device, Generator gen)
    {
        var init = initLoraWeights switch
        {
            JsonValue v when v.TryGetValue<bool>(out var flag) => flag ? "true" : "false",
            JsonValue v when v.TryGetValue<string>(out var method) => method,
            null => "true",
            _ => throw new UserInputException($"init_lora_weights={initLoraWeights.ToJsonString()} is not supported by MoeLora.Torch."),
        };
        if (init is not ("true" or "false" or "gaussian"))
            throw new UserInputException($"init_lora_weights='{init}' is not supported by MoeLora.Torch (true, false or gaussian).");
        Tensor Uniform(long o, long i) => (rand([o, i], generator: gen) * 2 - 1) / Math.Sqrt(i);
        Tensor a = init == "gaussian" ? normal(0, 1.0 / r, [rows, inF], generator: gen) : Uniform(rows, inF);
        Tensor b = init == "false" ? Uniform(outF, rows) : zeros(outF, rows);
        return (a.to(device), b.to(device));
    }

    /// <summary>
    /// PEFT's <c>with model.disable_adapter():</c> every LoRA wrapper computes its base layer only until the returned
    /// handle is disposed (which restores each wrapper's previous state).
    /// </summary>
    public static IDisposable DisableAdapters(CausalLm model)
    {
        var wrappers = model.NamedModules().Select(m => m.Module).OfType<LoraWrapper>().ToList();
        var previous = wrappers.Select(w => w.Enabled).ToList();
        foreach (var w in wrappers) w.Enabled = false;
        return new Restore(() => { for (int i = 0; i < wrappers.Count; i++) wrappers[i].Enabled = previous[i]; });
    }

    sealed class Restore(Action action) : IDisposable
    {
        bool _done;
        public void Dispose() { if (!_done) { _done = true; action(); } }
    }

    /// <summary>Run-time PEFT names of the adapter's trainable tensors, e.g. <c>base_model.model.…q_proj.lora_A.default.weight</c>.</summary>
    public static IEnumerable<(string Name, Parameter Param)> PeftNamedParameters(CausalLm model) =>
        model.NamedParameters().Where(p => p.Param.requires_grad).Select(p => (PeftPrefix + p.Name, p.Param));

    /// <summary>Loads a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) into <paramref name="model"/>.</summary>
    public static InjectedAdapter LoadPeftAdapter(CausalLm model, string dir, string adapterName = "default")
    {
        var cfgPath = Path.Combine(dir, "adapter_config.json");
        var weights = Path.Combine(dir, "adapter_model.safetensors");
        if (!File.Exists(cfgPath)) throw new FileNotFoundException($"{cfgPath} not found.");
        if (!File.Exists(weights)) throw new FileNotFoundException($"{weights} not found (adapter_model.bin is not supported).");
        var json = File.ReadAllText(cfgPath);
        var file = Core.Util.UserJson.ParseObject(json, cfgPath);
        // Core plans the saved config (already PEFT's effective config: its MoE rewrite finds nothing left to move).
        var injected = Inject(model, Plan(model, json, cfgPath), adapterName) with { ConfigJson = file };
        var tensors = Safetensors.Load(weights);
        try
        {
            var expected = SavedNames(model, adapterName).ToDictionary(x => x.FileKey, x => x.Param);
            var errors = new List<string>();
            errors.AddRange(expected.Keys.Where(k => !tensors.ContainsKey(k)).Select(k => $"missing: {k}"));
            errors.AddRange(tensors.Keys.Where(k => !expected.ContainsKey(k) && !BeyondDepth(k, model.NumLayers)).Select(k => $"unexpected: {k}"));
            foreach (var (k, p) in expected)
                if (tensors.TryGetValue(k, out var t) && !t.shape.SequenceEqual(p.shape))
                    errors.Add($"shape mismatch: {k} file [{string.Join(",", t.shape)}] vs model [{string.Join(",", p.shape)}]");
            if (errors.Count > 0) throw new InvalidDataException($"{weights} does not match the injected adapter:\n  " + string.Join("\n  ", errors.Take(40)));
            using (no_grad()) foreach (var (k, p) in expected) p.copy_(tensors[k]);
        }
        finally { foreach (var t in tensors.Values) t.Dispose(); }
        return injected;
    }

    /// <summary>Writes adapter_config.json and adapter_model.safetensors with PEFT's keys (prefix kept, adapter name removed).</summary>
    public static void SavePeftAdapter(CausalLm model, InjectedAdapter adapter, string dir)
    {
        Directory.CreateDirectory(dir);
        var tensors = SavedNames(model, adapter.AdapterName).Select(x => new KeyValuePair<string, Tensor>(x.FileKey, x.Param)).ToList();
        var untrained = new List<Tensor>();
        if (adapter.SavePlan is { } whole)
        {
            var have = tensors.Select(t => t.Key).ToHashSet(StringComparer.Ordinal);
            foreach (var t in whole.SavedTensors.Where(t => !have.Contains(t.SavedKey!)))
            {
                if (!BeyondDepth(t.SavedKey!, model.NumLayers))
                    throw new InvalidOperationException($"the whole model's plan saves {t.SavedKey}, which the (truncated) adapter should have had.");
                var value = UntrainedFactor(t.SavedKey!, t.Shape);
                untrained.Add(value);
                tensors.Add(new(t.SavedKey!, value));
            }
        }
        if ((adapter.SavePlan ?? adapter.Plan) is { } plan)
        {
            // What PEFT's save_pretrained writes for this plan: same keys and shapes, or we refuse to write a different file.
            var want = plan.SavedTensors.Select(t => $"{t.SavedKey} [{string.Join(",", t.Shape)}]").Order(StringComparer.Ordinal);
            var have = tensors.Select(t => $"{t.Key} [{string.Join(",", t.Value.shape)}]").Order(StringComparer.Ordinal);
            if (!want.SequenceEqual(have))
                throw new InvalidOperationException($"the adapter to save differs from the plan's saved tensors: {string.Join(", ", have.Except(want).Concat(want.Except(have).Select(x => "missing " + x)).Take(6))}.");
        }
        Safetensors.Save(Path.Combine(dir, "adapter_model.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        foreach (var t in untrained) t.Dispose();
        var json = (JsonObject)adapter.ConfigJson.DeepClone();
        json["inference_mode"] = true; // PEFT sets this when saving
        File.WriteAllText(Path.Combine(dir, "adapter_config.json"), json.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
    }

    /// <summary>True for a key of a decoder block the (truncated) model does not have.</summary>
    internal static bool BeyondDepth(string key, int numLayers)
    {
        var m = System.Text.RegularExpressions.Regex.Match(key, @"\.layers\.(\d+)\.");
        return m.Success && int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture) >= numLayers;
    }

    /// <summary>
    /// A LoRA factor as PEFT initialises it (init_lora_weights=true: A ~ U(±1/√in), B = 0), for blocks the trainer
    /// never saw: the adapter there is the identity, as it was during training. Seeded by the key (deterministic).
    /// </summary>
    static Tensor UntrainedFactor(string key, long[] shape)
    {
        if (key.Contains(".lora_B.", StringComparison.Ordinal)) return zeros(shape);
        if (!key.Contains(".lora_A.", StringComparison.Ordinal))
            throw new NotSupportedException($"{key}: cannot write an untrained value for this tensor kind.");
        ulong seed = 1469598103934665603UL;
        foreach (var c in key) seed = (seed ^ c) * 1099511628211UL; // FNV-1a
        using var gen = new Generator(seed);
        return (rand(shape, generator: gen) * 2 - 1) / Math.Sqrt(shape[^1]);
    }

    static IEnumerable<(string FileKey, Parameter Param)> SavedNames(CausalLm model, string adapter)
    {
        var infix = $".{adapter}.";
        foreach (var (name, p) in model.NamedParameters())
            if (name.Contains(".lora_A" + infix) || name.Contains(".lora_B" + infix) || name.Contains(".lora_magnitude_vector" + infix))
                yield return (SavedKey(PeftPrefix + name, adapter), p);
    }

    /// <summary>
    /// The adapter_model.safetensors key of a run-time PEFT name: the adapter name is dropped, and DoRA's
    /// <c>lora_magnitude_vector.{adapter}.weight</c> is saved as <c>lora_magnitude_vector</c> (PEFT's legacy key).
    /// </summary>
    public static string SavedKey(string peftRuntimeName, string adapter = "default")
    {
        var key = peftRuntimeName.Replace($".{adapter}.", ".", StringComparison.Ordinal);
        return key.EndsWith(".lora_magnitude_vector.weight", StringComparison.Ordinal) ? key[..^".weight".Length] : key;
    }
}
