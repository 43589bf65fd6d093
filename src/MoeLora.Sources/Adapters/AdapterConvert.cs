using System.Text.Json.Nodes;
using MoeLora.Core;
using MoeLora.Sources.Safetensors;

namespace MoeLora.Sources.Adapters;

/// <summary>
/// Exact re-layouts of routed-expert LoRA between PEFT's fused ParamWrapper format and the per-expert format.
/// Fused (peft-semantics §2.3): A (R·E, in) with expert-major rows (row e·R + k), B (out, R·E) with rank-major columns
/// (column k·E + e); ΔW_e = B_e·A_e·scaling. gate_up_proj's rows are gate then up (transformers v5 concatenation), so
/// a fused rank-R gate_up splits exactly into gate and up LoRAs of rank R that share A. Per-expert → fused stacks
/// A = [A_gate; A_up] and makes B block-diagonal, as PEFT 0.19+ does on load; when gate and up share A (our own
/// split) B is stacked instead, which makes the round trip bit-exact. Only bytes move, so every dtype is exact.
/// </summary>
public static class AdapterConvert
{
    public static readonly string[] Targets = ["peft-v5", "per-expert", "vllm"];

    public static AdapterFolder Convert(AdapterFolder input, string to) => to switch
    {
        "peft-v5" => ToFused(input),
        "per-expert" => ToPerExpert(input, uniformRank: false),
        "vllm" => ToPerExpert(input, uniformRank: true),
        _ => throw new UserInputException($"--to '{to}': use {string.Join(", ", Targets)}"),
    };

    public static AdapterFolder ToPerExpert(AdapterFolder input, bool uniformRank)
    {
        var (pairs, other) = LoraPairs.Read(input);
        bool rslora = LoraPairs.Bool(input.Config, "use_rslora");
        var outPairs = new List<(string Module, AdapterTensor A, AdapterTensor B, int Rank, double Alpha)>();
        var converted = new HashSet<string>(StringComparer.Ordinal);
        foreach (var p in pairs)
        {
            if (p.Parameter is null || p.Experts == 1)
            {
                outPairs.Add((p.Module, p.A, p.B, p.Rank, p.Alpha));
                continue;
            }
            if (p.Parameter is not ("gate_up_proj" or "down_proj"))
                throw new UserInputException($"{p.Module}.{p.Parameter}: only gate_up_proj and down_proj have a per-expert form.");
            if (p.B.Shape[0] % 2 != 0 && p.Parameter == "gate_up_proj")
                throw new UserInputException($"{p.Module}.gate_up_proj: lora_B has an odd number of rows ({p.B.Shape[0]}), not gate and up halves.");
            converted.Add(p.Module[(p.Module.LastIndexOf('.') + 1)..] + "." + p.Parameter);
            for (int e = 0; e < p.Experts; e++)
            {
                var a = Rows(p.A, e * p.Rank, p.Rank, $"{p.A.Name}[{e}]");
                var b = ExpertColumns(p.B, e, p.Experts, p.Rank);
                if (p.Parameter == "down_proj")
                    outPairs.Add(($"{p.Module}.{e}.down_proj", a, b, p.Rank, p.Alpha));
                else
                {
                    long half = p.B.Shape[0] / 2;
                    outPairs.Add(($"{p.Module}.{e}.gate_proj", a, Rows(b, 0, half, ""), p.Rank, p.Alpha));
                    outPairs.Add(($"{p.Module}.{e}.up_proj", a, Rows(b, half, half, ""), p.Rank, p.Alpha));
                }
            }
        }
        if (converted.Count == 0)
            throw new UserInputException("the adapter has no fused expert LoRA (ParamWrapper on gate_up_proj/down_proj) to convert.");

        var config = (JsonObject)input.Config.DeepClone();
        int r = LoraPairs.Int(config, "r", 8);
        double alpha = LoraPairs.Double(config, "lora_alpha", 8);
        if (uniformRank)
        {
            // vLLM reads one r and lora_alpha per adapter (its --max-lora-rank must cover the largest rank, which
            // is the doubled gate_up rank): pad every pair with zero rank rows/columns to the largest rank. This
            // needs one scaling for all pairs; ΔW is unchanged because the added terms are exact zeros.
            int maxRank = outPairs.Max(p => p.Rank);
            var scalings = outPairs.Select(p => rslora ? p.Alpha / Math.Sqrt(p.Rank) : p.Alpha / p.Rank).Distinct().ToList();
            if (scalings.Count > 1)
                throw new UserInputException($"--to vllm needs one scaling alpha/r for every LoRA (vLLM reads one r and lora_alpha); this adapter has {string.Join(", ", scalings)}.");
            if (rslora)
                throw new UserInputException("--to vllm: use_rslora adapters cannot be padded to one rank without changing the scaling.");
            outPairs = outPairs.Select(p => (p.Module, PadRows(p.A, maxRank), PadColumns(p.B, maxRank), maxRank, scalings[0] * maxRank)).ToList();
            config["r"] = maxRank;
            config["lora_alpha"] = scalings[0] * maxRank;
            config["rank_pattern"] = new JsonObject();
            config["alpha_pattern"] = new JsonObject();
        }
        else
        {
            var rp = config["rank_pattern"] as JsonObject ?? new JsonObject();
            var ap = config["alpha_pattern"] as JsonObject ?? new JsonObject();
            foreach (var key in rp.Select(kv => kv.Key).Where(k => k.Contains("gate_up_proj") || k.Contains("down_proj")).ToList()) rp.Remove(key);
            foreach (var key in ap.Select(kv => kv.Key).Where(k => k.Contains("gate_up_proj") || k.Contains("down_proj")).ToList()) ap.Remove(key);
            foreach (var proj in new[] { "gate_proj", "up_proj", "down_proj" })
            {
                var one = outPairs.Where(p => p.Module.EndsWith("." + proj, StringComparison.Ordinal)).ToList();
                if (one.Count == 0) continue;
                int rank = one[0].Rank; double al = one[0].Alpha;
                if (one.Any(p => p.Rank != rank || p.Alpha != al))
                    throw new UserInputException($"{proj}: experts of different layers have different ranks; the per-expert config cannot express it with one rank_pattern key.");
                if (rank != r) rp[$@"experts\.\d+\.{proj}"] = rank;
                if (al != alpha) ap[$@"experts\.\d+\.{proj}"] = al;
            }
            config["rank_pattern"] = rp;
            config["alpha_pattern"] = ap;
        }
        var targetParams = LoraPairs.TargetParameters(config).Where(t => !converted.Any(c => t == c || t.EndsWith("." + c, StringComparison.Ordinal) || c.EndsWith("." + t, StringComparison.Ordinal))).ToList();
        config["target_parameters"] = targetParams.Count == 0 ? null : new JsonArray(targetParams.Select(t => (JsonNode)t).ToArray());
        var modules = LoraPairs.StringList(config, "target_modules").ToList();
        foreach (var proj in outPairs.Select(p => p.Module[(p.Module.LastIndexOf('.') + 1)..]).Where(n => n is "gate_proj" or "up_proj" or "down_proj").Distinct())
            if (!modules.Contains(proj)) modules.Add(proj);
        config["target_modules"] = new JsonArray(modules.Select(m => (JsonNode)m).ToArray());
        return new AdapterFolder(config, Emit(outPairs.Select(p => (p.Module, p.A, p.B)), other));
    }

    public static AdapterFolder ToFused(AdapterFolder input)
    {
        var (pairs, other) = LoraPairs.Read(input);
        bool rslora = LoraPairs.Bool(input.Config, "use_rslora");
        var keep = pairs.Where(p => p.ExpertIndex is null || p.Location != "routed").ToList();
        var experts = pairs.Where(p => p.ExpertIndex is not null && p.Location == "routed").ToList();
        if (experts.Count == 0)
            throw new UserInputException("the adapter has no per-expert LoRA (…experts.<e>.<proj>) to fuse.");
        var outPairs = keep.Select(p => (Module: p.Module, p.Depth, p.A, p.B)).ToList();
        double? gateUpRank = null, gateUpAlpha = null, downRank = null, downAlpha = null;
        foreach (var owner in experts.GroupBy(p => p.Module[..p.Module.LastIndexOf(".experts.", StringComparison.Ordinal)] + ".experts").OrderBy(g => g.Key, StringComparer.Ordinal))
        {
            int count = owner.Max(p => p.ExpertIndex!.Value) + 1;
            var byProj = owner.ToDictionary(p => (p.ExpertIndex!.Value, p.ExpertProjection!));
            foreach (var p in owner)
                if (p.ExpertProjection is not ("gate_proj" or "up_proj" or "down_proj"))
                    throw new UserInputException($"{p.Module}: expert projection '{p.ExpertProjection}' has no fused transformers-v5 parameter (expected gate_proj, up_proj, down_proj).");
            bool hasGate = owner.Any(p => p.ExpertProjection == "gate_proj"), hasUp = owner.Any(p => p.ExpertProjection == "up_proj");
            if (hasGate != hasUp)
                throw new UserInputException($"{owner.Key}: only {(hasGate ? "gate_proj" : "up_proj")} is adapted; the fused gate_up_proj needs both halves (PEFT raises the same, #3127).");
            var fusedDown = hasGate || owner.Any(p => p.ExpertProjection == "down_proj") ? new List<(AdapterTensor A, AdapterTensor B)>() : null;
            var gateUp = new List<(AdapterTensor A, AdapterTensor B)>();
            double? scale = null;
            for (int e = 0; e < count; e++)
            {
                if (hasGate)
                {
                    if (!byProj.TryGetValue((e, "gate_proj"), out var g) || !byProj.TryGetValue((e, "up_proj"), out var u))
                        throw new UserInputException($"{owner.Key}: expert {e} has no gate_proj/up_proj LoRA; the fused format needs every expert.");
                    if (g.Scaling(rslora) != u.Scaling(rslora))
                        throw new UserInputException($"{owner.Key}.{e}: gate_proj and up_proj have different scalings; one fused LoRA has one.");
                    scale = g.Scaling(rslora);
                    bool sharedA = g.Rank == u.Rank && g.A.Data.AsSpan().SequenceEqual(u.A.Data);
                    if (sharedA)
                    {
                        gateUp.Add((g.A, StackRows(g.B, u.B)));
                        gateUpRank = g.Rank; gateUpAlpha = g.Alpha;
                    }
                    else
                    {
                        gateUp.Add((StackRows(g.A, u.A), BlockDiagonal(g.B, u.B)));
                        gateUpRank = g.Rank + u.Rank; gateUpAlpha = g.Alpha + u.Alpha;
                    }
                }
                if (byProj.TryGetValue((e, "down_proj"), out var d))
                {
                    fusedDown!.Add((d.A, d.B));
                    downRank = d.Rank; downAlpha = d.Alpha;
                }
                else if (owner.Any(p => p.ExpertProjection == "down_proj"))
                    throw new UserInputException($"{owner.Key}: expert {e} has no down_proj LoRA; the fused format needs every expert.");
            }
            bool both = gateUp.Count > 0 && fusedDown is { Count: > 0 };
            if (gateUp.Count > 0) outPairs.Add((owner.Key, both ? 1 : 0, StackExpertRows(gateUp.Select(x => x.A).ToList()), InterleaveColumns(gateUp.Select(x => x.B).ToList())));
            if (fusedDown is { Count: > 0 }) outPairs.Add((owner.Key, 0, StackExpertRows(fusedDown.Select(x => x.A).ToList()), InterleaveColumns(fusedDown.Select(x => x.B).ToList())));
        }

        var config = (JsonObject)input.Config.DeepClone();
        var modules = LoraPairs.StringList(config, "target_modules").Where(m => m is not ("gate_proj" or "up_proj" or "down_proj")).ToList();
        config["target_modules"] = new JsonArray(modules.Select(m => (JsonNode)m).ToArray());
        var tp = LoraPairs.TargetParameters(config).ToList();
        var rp = config["rank_pattern"] as JsonObject ?? new JsonObject();
        var ap = config["alpha_pattern"] as JsonObject ?? new JsonObject();
        foreach (var key in rp.Select(kv => kv.Key).Where(k => k.Contains("experts")).ToList()) rp.Remove(key);
        foreach (var key in ap.Select(kv => kv.Key).Where(k => k.Contains("experts")).ToList()) ap.Remove(key);
        int r = LoraPairs.Int(config, "r", 8);
        double alpha = LoraPairs.Double(config, "lora_alpha", 8);
        if (gateUpRank is double gr)
        {
            if (!tp.Contains("experts.gate_up_proj")) tp.Add("experts.gate_up_proj");
            if ((int)gr != r) rp["experts.gate_up_proj"] = (int)gr;
            if (gateUpAlpha != alpha) ap["experts.gate_up_proj"] = gateUpAlpha;
        }
        if (downRank is double dr)
        {
            if (!tp.Contains("experts.down_proj")) tp.Add("experts.down_proj");
            if ((int)dr != r) rp["experts.down_proj"] = (int)dr;
            if (downAlpha != alpha) ap["experts.down_proj"] = downAlpha;
        }
        config["target_parameters"] = new JsonArray(tp.Select(t => (JsonNode)t).ToArray());
        config["rank_pattern"] = rp;
        config["alpha_pattern"] = ap;
        var emitted = outPairs.Select(p => (p.Module + string.Concat(Enumerable.Repeat(".base_layer", p.Depth)), p.A, p.B));
        return new AdapterFolder(config, Emit(emitted, other));
    }

    private static List<AdapterTensor> Emit(IEnumerable<(string Module, AdapterTensor A, AdapterTensor B)> pairs, IReadOnlyList<AdapterTensor> other)
    {
        var list = new List<AdapterTensor>(other);
        foreach (var (m, a, b) in pairs)
        {
            list.Add(a with { Name = $"{LoraPairs.Prefix}{m}.lora_A.weight" });
            list.Add(b with { Name = $"{LoraPairs.Prefix}{m}.lora_B.weight" });
        }
        var dup = list.GroupBy(t => t.Name).FirstOrDefault(g => g.Count() > 1);
        if (dup is not null) throw new UserInputException($"converting would write key {dup.Key} twice.");
        return list.OrderBy(t => t.Name, StringComparer.Ordinal).ToList();
    }

    private static AdapterTensor Rows(AdapterTensor t, long start, long count, string name)
    {
        long rowBytes = t.Shape[1] * t.ElementSize;
        var data = t.Data.AsSpan((int)(start * rowBytes), (int)(count * rowBytes)).ToArray();
        return new AdapterTensor(name, t.Dtype, [count, t.Shape[1]], data);
    }

    private static AdapterTensor ExpertColumns(AdapterTensor b, int e, int experts, int rank)
    {
        int es = b.ElementSize; long outF = b.Shape[0], cols = b.Shape[1];
        var data = new byte[outF * rank * es];
        for (long o = 0; o < outF; o++)
            for (int k = 0; k < rank; k++)
                Buffer.BlockCopy(b.Data, (int)((o * cols + (long)k * experts + e) * es), data, (int)((o * rank + k) * es), es);
        return new AdapterTensor("", b.Dtype, [outF, rank], data);
    }

    private static AdapterTensor StackRows(AdapterTensor x, AdapterTensor y)
    {
        if (x.Shape[1] != y.Shape[1] || x.Dtype != y.Dtype)
            throw new UserInputException($"{x.Name} and {y.Name} cannot be stacked: shapes {x.ShapeText} and {y.ShapeText}.");
        return new AdapterTensor("", x.Dtype, [x.Shape[0] + y.Shape[0], x.Shape[1]], [.. x.Data, .. y.Data]);
    }

    private static AdapterTensor StackExpertRows(List<AdapterTensor> perExpert)
    {
        var first = perExpert[0];
        if (perExpert.Any(t => t.Shape[0] != first.Shape[0] || t.Shape[1] != first.Shape[1] || t.Dtype != first.Dtype))
            throw new UserInputException($"per-expert lora_A tensors of {first.Name} differ in shape or dtype; the fused format needs one rank.");
        return new AdapterTensor("", first.Dtype, [first.Shape[0] * perExpert.Count, first.Shape[1]], perExpert.SelectMany(t => t.Data).ToArray());
    }

    private static AdapterTensor InterleaveColumns(List<AdapterTensor> perExpert)
    {
        var first = perExpert[0];
        if (perExpert.Any(t => t.Shape[0] != first.Shape[0] || t.Shape[1] != first.Shape[1] || t.Dtype != first.Dtype))
            throw new UserInputException($"per-expert lora_B tensors of {first.Name} differ in shape or dtype; the fused format needs one rank.");
        int es = first.ElementSize, experts = perExpert.Count;
        long outF = first.Shape[0], rank = first.Shape[1], cols = rank * experts;
        var data = new byte[outF * cols * es];
        for (int e = 0; e < experts; e++)
            for (long o = 0; o < outF; o++)
                for (long k = 0; k < rank; k++)
                    Buffer.BlockCopy(perExpert[e].Data, (int)((o * rank + k) * es), data, (int)((o * cols + k * experts + e) * es), es);
        return new AdapterTensor("", first.Dtype, [outF, cols], data);
    }

    private static AdapterTensor BlockDiagonal(AdapterTensor x, AdapterTensor y)
    {
        int es = x.ElementSize; long rx = x.Shape[0], cx = x.Shape[1], ry = y.Shape[0], cy = y.Shape[1], cols = cx + cy;
        var data = new byte[(rx + ry) * cols * es];
        for (long o = 0; o < rx; o++) Buffer.BlockCopy(x.Data, (int)(o * cx * es), data, (int)(o * cols * es), (int)(cx * es));
        for (long o = 0; o < ry; o++) Buffer.BlockCopy(y.Data, (int)(o * cy * es), data, (int)(((rx + o) * cols + cx) * es), (int)(cy * es));
        return new AdapterTensor("", x.Dtype, [rx + ry, cols], data);
    }

    private static AdapterTensor PadRows(AdapterTensor a, int rank)
    {
        var data = new byte[rank * a.Shape[1] * a.ElementSize];
        a.Data.CopyTo(data, 0);
        return a with { Shape = [rank, a.Shape[1]], Data = data };
    }

    private static AdapterTensor PadColumns(AdapterTensor b, int rank)
    {
        int es = b.ElementSize; long outF = b.Shape[0], r = b.Shape[1];
        var data = new byte[outF * rank * es];
        for (long o = 0; o < outF; o++) Buffer.BlockCopy(b.Data, (int)(o * r * es), data, (int)(o * rank * es), (int)(r * es));
        return b with { Shape = [outF, rank], Data = data };
    }
}
