using System.Text.Json.Nodes;

namespace MoeLora.Sources.Adapters;

/// <summary>What an adapter adapts, in which layout it was saved, and the traps it falls into.</summary>
public sealed record AdapterInspection(
    string Layout, string? PeftVersion, IReadOnlyList<LoraPair> Pairs, IReadOnlyList<string> OtherKeys,
    IReadOnlyDictionary<string, int> ByLocation, IReadOnlyList<string> Traps)
{
    public JsonObject ToJson(bool rslora) => new()
    {
        ["layout"] = Layout,
        ["peft_version"] = PeftVersion,
        ["by_location"] = new JsonObject(ByLocation.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)kv.Value))),
        ["adapters"] = new JsonArray(Pairs.Select(p => (JsonNode)new JsonObject
        {
            ["module"] = p.Module,
            ["parameter"] = p.Parameter,
            ["location"] = p.Location,
            ["r"] = p.Rank,
            ["lora_alpha"] = p.Alpha,
            ["scaling"] = p.Scaling(rslora),
            ["experts"] = p.Experts,
            ["lora_A"] = new JsonArray(p.A.Shape.Select(s => (JsonNode)s).ToArray()),
            ["lora_B"] = new JsonArray(p.B.Shape.Select(s => (JsonNode)s).ToArray()),
        }).ToArray()),
        ["other_keys"] = new JsonArray(OtherKeys.Select(k => (JsonNode)k).ToArray()),
        ["traps"] = new JsonArray(Traps.Select(t => (JsonNode)t).ToArray()),
    };
}

public static class AdapterInspector
{
    /// <param name="modelModules">named_modules() of the model the adapter is meant for, when known.</param>
    /// <param name="modelParameters">named_parameters() of that model.</param>
    /// <param name="expertLayout">The model's expert layout when known (else read from the adapter's config when PEFT recorded it).</param>
    public static AdapterInspection Inspect(AdapterFolder folder, IReadOnlySet<string>? modelModules = null, IReadOnlySet<string>? modelParameters = null,
        ExpertLayout? expertLayout = null)
    {
        var (pairs, other) = LoraPairs.Read(folder);
        var cfg = folder.Config;
        string? version = cfg["peft_version"] is JsonValue v ? v.ToString() : null;
        var traps = new List<string>();
        var known = expertLayout ?? ExpertLayout.FromAdapterConfig(cfg);
        var fused = pairs.Where(p => p.Parameter is not null && p.Experts > 1).ToList();
        var perExpert = pairs.Where(p => p.ExpertIndex is not null && p.Location == "routed").ToList();
        bool threeD = folder.Tensors.Any(t => t.Shape.Length == 3 && t.Name.Contains("lora_"));
        bool swapped = false;

        // PEFT 0.19.0 inverted 0.19.1+'s rule (fixed by PEFT #3165): for (E, out, in) experts gate_up's lora_A then reads
        // the 2·intermediate side and down's lora_B the intermediate side, instead of both reading the hidden size.
        // Experts PEFT reads transposed even in 0.21 (Llama 4, see ExpertLayout.PeftDeltaTransposed) are the other way round.
        foreach (var owner in fused.GroupBy(p => p.Module))
        {
            var gu = owner.FirstOrDefault(p => p.Parameter == "gate_up_proj");
            var dn = owner.FirstOrDefault(p => p.Parameter == "down_proj");
            if (gu is null || dn is null || gu.A.Shape[1] == dn.B.Shape[0] && gu.A.Shape[1] == 2 * dn.B.Shape[0]) continue;
            bool hiddenSided = gu.A.Shape[1] == dn.B.Shape[0], expertSided = gu.A.Shape[1] == 2 * dn.B.Shape[0];
            if (known?.PeftDeltaTransposed(owner.Key) == true ? hiddenSided : expertSided) swapped = true;
        }
        if (fused.Count > 0 && version == "0.19.0") swapped = true;
        if (swapped)
            traps.Add("swapped 3-D orientation: saved by PEFT 0.19.0, which swapped in/out features of 3-D expert parameters (fixed in 0.19.1, PEFT #3165); newer PEFT reads these factors transposed.");

        string layout = threeD ? "sglang-3d (lora_A/lora_B with an expert dimension)"
            : swapped ? "peft-0.19.0-swapped fused ParamWrapper"
            : fused.Count > 0 && perExpert.Count > 0 ? "mixed: fused ParamWrapper and per-expert"
            : fused.Count > 0 ? "peft-v5 fused ParamWrapper (A (r·E, in) expert-major, B (out, r·E) rank-major)"
            : perExpert.Count > 0 ? "per-expert 2-D (PEFT <= 0.18 / transformers 4.x, vLLM 2-D)"
            : "no expert LoRA (dense modules only)";

        if (!pairs.Any(p => p.Location == "routed"))
            traps.Add("no routed-expert adapter: no LoRA reaches the routed experts" +
                (pairs.Any(p => p.Location == "shared") ? " (only the shared experts are adapted)." : "."));

        foreach (var owner in perExpert.GroupBy(p => p.Module[..p.Module.LastIndexOf(".experts.", StringComparison.Ordinal)]))
        {
            var projs = owner.Select(p => p.ExpertProjection!).ToHashSet();
            foreach (var (x, y) in new[] { ("gate_proj", "up_proj"), ("w1", "w3") })
                if (projs.Contains(x) != projs.Contains(y))
                    traps.Add($"one half of a fused pair: {owner.Key}.experts adapts {(projs.Contains(x) ? x : y)} but not {(projs.Contains(x) ? y : x)}; transformers v5 fuses them into gate_up_proj and PEFT 0.19+ raises (PEFT #3127).");
        }
        if (perExpert.Count > 0 && known?.PeftConvertsPerExpert == false)
            traps.Add($"per-expert adapter that PEFT 0.19+ does not convert on load: {known.ModelType} has no entry in PEFT's MoE conversion table, " +
                "so PEFT (0.21 checked) reports the per-expert keys as unexpected, the fused experts get no LoRA, and target_modules such as " +
                "gate_proj still match dense or shared-expert modules of that name, which get new untrained LoRA; load it with PEFT <= 0.18 " +
                "or convert it with `moelora adapter convert --to peft-v5`.");
        var targets = LoraPairs.StringList(cfg, "target_modules");
        foreach (var (x, y) in new[] { ("gate_proj", "up_proj"), ("w1", "w3") })
            if (targets.Contains(x) != targets.Contains(y))
                traps.Add($"one half of a fused pair: target_modules names {(targets.Contains(x) ? x : y)} without {(targets.Contains(x) ? y : x)}; PEFT 0.19+ raises ValueError on fused-expert models (PEFT #3127).");

        if (modelModules is not null && modelParameters is not null)
        {
            foreach (var p in pairs)
            {
                bool ok = p.Parameter is not null ? modelParameters.Contains(p.Module + "." + p.Parameter) : modelModules.Contains(p.Module);
                if (!ok)
                    traps.Add($"the model would not load {LoraPairs.Prefix}{p.Module}{string.Concat(Enumerable.Repeat(".base_layer", p.Depth))}.lora_A/B: the model has no {(p.Parameter is null ? "module" : "parameter")} {p.PatternName}.");
            }
        }

        traps.AddRange(VllmFormat.Traps(folder, pairs, other, known));

        var byLocation = pairs.GroupBy(p => p.Location).OrderBy(g => g.Key, StringComparer.Ordinal).ToDictionary(g => g.Key, g => g.Count());
        return new AdapterInspection(layout, version, pairs, other.Select(t => t.Name).ToList(), byLocation, traps);
    }
}
