using System.Globalization;
using System.Text.Json.Nodes;
using MoeLora.Core.Analysis;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Cli.Rendering;

/// <summary>
/// The seed report's section 6 ("MoE vs Dense") computed from two real analyses: target modules, adapter counts,
/// LoRA parameters, expert isolation, where hidden states come from, memory and gradient flow.
/// </summary>
public static class DiffRows
{
    public sealed record Row(string Aspect, string Key, string A, string B);

    public static IReadOnlyList<Row> Build(LoraReport a, LoraReport b) =>
    [
        new("Model", "model", Model(a), Model(b)),
        new("LoraConfig", "lora_config", a.Plan.Requested.Describe(), b.Plan.Requested.Describe()),
        new("Target modules", "target_modules", Targets(a), Targets(b)),
        new("Adapter instances", "adapter_instances", Count(a.Plan.Targets.Count), Count(b.Plan.Targets.Count)),
        new("Adapters by location", "adapters_by_location", ByLocation(a), ByLocation(b)),
        new("LoRA params", "lora_parameters", Count(a.Plan.LoraParameters), Count(b.Plan.LoraParameters)),
        new("Trainable params", "trainable_parameters", $"{Count(a.Plan.TrainableParameters)} ({Units.Percent(a.TrainablePercent)})", $"{Count(b.Plan.TrainableParameters)} ({Units.Percent(b.TrainablePercent)})"),
        new("Expert isolation", "expert_isolation", Isolation(a), Isolation(b)),
        new("Hidden states", "hidden_states", HiddenSource(a), HiddenSource(b)),
        new("Hidden states memory", "hidden_states_memory", HiddenMemory(a), HiddenMemory(b)),
        new("Adapter memory", "adapter_memory", $"{Units.Bytes(a.AdapterMemoryBytes)} (fp32)", $"{Units.Bytes(b.AdapterMemoryBytes)} (fp32)"),
        new("Training peak per GPU", "training_per_gpu", Memory(a), Memory(b)),
        new("Gradient flow", "gradient_flow", Gradient(a), Gradient(b)),
    ];

    public static JsonObject ToJson(LoraReport a, LoraReport b) => new()
    {
        ["schema"] = "moelora.diff/1",
        ["a"] = a.Options.ModelId,
        ["b"] = b.Options.ModelId,
        ["rows"] = new JsonArray(Build(a, b).Select(r => (JsonNode)new JsonObject { ["aspect"] = r.Key, ["a"] = r.A, ["b"] = r.B }).ToArray()),
        ["memory"] = new JsonObject
        {
            ["a"] = MoeLora.Core.Memory.TrainingMemoryJson.ToJson(a.Training),
            ["b"] = MoeLora.Core.Memory.TrainingMemoryJson.ToJson(b.Training),
        },
    };

    private static string Count(long n) => n.ToString("N0", CultureInfo.InvariantCulture);

    private static string Model(LoraReport r)
    {
        var moe = r.Spec.Moe;
        return $"{r.Options.ModelId} ({r.Spec.ModelType}, {(moe.IsMoe ? $"MoE {moe.NumExperts} experts top-{moe.ExpertsPerToken}" : "dense")}, {Count(r.Spec.Tree.NumParameters)} params)";
    }

    private static string Targets(LoraReport r)
    {
        var names = r.Plan.Targets.Select(t => t.ParameterName is null ? Leaf(t.ModuleName) : Leaf(t.ModuleName) + "." + t.ParameterName).Distinct().ToList();
        return $"{r.Plan.Targets.Count} adapted ({string.Join(", ", names.Take(8))}{(names.Count > 8 ? ", …" : "")})";
    }

    private static string Leaf(string name) => name[(name.LastIndexOf('.') + 1)..];

    private static string ByLocation(LoraReport r) =>
        string.Join(", ", r.ByLocation().Select(x => $"{x.Location.Label()} {x.Adapters}"));

    private static string Isolation(LoraReport r)
    {
        var moe = r.Spec.Moe;
        if (!moe.IsMoe) return "N/A (dense: no experts)";
        var e = r.Experts;
        if (e.ExpertsWithAdapters == 0) return $"none: the {moe.NumExperts} routed experts get no LoRA (only non-expert modules are adapted)";
        return e.Mode.StartsWith("per-expert", StringComparison.Ordinal)
            ? $"each of {e.ExpertsWithAdapters} experts has its own LoRA slice (rank r rows of one fused lora_A per expert) in {e.LayersWithExpertAdapters} layers"
            : $"each of {e.ExpertsWithAdapters} experts has its own lora_A/lora_B module in {e.LayersWithExpertAdapters} layers";
    }

    private static string HiddenSource(LoraReport r)
    {
        var moe = r.Spec.Moe;
        if (!moe.IsMoe) return "direct layer output: residual + attention + dense MLP";
        var shared = moe.SharedExperts > 0 ? " + shared expert" : "";
        return $"post-routing combination: residual + Σ top-{moe.ExpertsPerToken} router-weighted expert outputs{shared}" +
               (moe.DenseLayers.Count > 0 ? $" ({moe.DenseLayers.Count} dense layers: MLP output)" : "");
    }

    private static string HiddenMemory(LoraReport r) =>
        $"all {r.HiddenStates.NumStates}: {Units.Bytes(r.HiddenStates.AllLayersBytes)}; targets [{string.Join(", ", r.HiddenStates.TargetLayers)}]: {Units.Bytes(r.HiddenStates.TargetLayersBytes)}";

    private static string Memory(LoraReport r) =>
        $"{Units.Bytes(r.Training.PerGpuBytes)} ({(r.Training.Fits ? "fits" : "does not fit")} {Units.Bytes(r.Training.Setup.GpuMemoryBytes)}); activations {Units.Bytes(r.Training["activations"] + r.Training["checkpoints"])}";

    private static string Gradient(LoraReport r)
    {
        var moe = r.Spec.Moe;
        var routed = r.Plan.Targets.Any(t => t.Location == ModuleLocation.RoutedExpert);
        var router = r.Plan.Targets.Any(t => t.Location == ModuleLocation.Router);
        if (!moe.IsMoe) return "every adapted module, every token";
        var parts = new List<string>();
        parts.Add(routed
            ? $"expert adapters: only the top-{moe.ExpertsPerToken} of {moe.NumExperts} experts each token is routed to (≈{100.0 * moe.ExpertsPerToken / moe.NumExperts:0.#}% of expert LoRA per token)"
            : "no expert adapters: expert weights get no LoRA gradient");
        if (r.Plan.Targets.Any(t => t.Location is ModuleLocation.Attention or ModuleLocation.SharedExpert or ModuleLocation.Mlp))
            parts.Add("attention/shared/dense adapters: every token");
        parts.Add(router ? "router adapted (routing can change)" : "router frozen");
        return string.Join("; ", parts);
    }
}
