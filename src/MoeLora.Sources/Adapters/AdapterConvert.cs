using System.Text.Json.Nodes;
using MoeLora.Core;
using MoeLora.Sources.Safetensors;

namespace MoeLora.Sources.Adapters;

/// <summary>
/// Exact re-layouts of routed-expert LoRA between PEFT's fused ParamWrapper format and the per-expert format.
/// Fused (peft-semantics §2.3): A (R·E, in) with expert-major rows (row e·R + k), B (out, R·E) with rank-major columns
/// (column k·E + e); ΔW_e = B_e·A_e·scaling. gate_up_proj's output features hold gate and up in the order the model's
/// experts use them (<see cref="ExpertLayout.Order"/>: gate then up, or interleaved in gpt-oss), so a fused rank-R
/// gate_up splits exactly into gate and up LoRAs of rank R that share A (B's rows are split, A is kept). Per-expert →
/// fused stacks A = [A_gate; A_up] and makes B block-diagonal, as PEFT 0.19+ does on load; when gate and up share A
/// (our own split) B's rows are merged instead, which makes the round trip bit-exact. Only bytes move, so every dtype
/// is exact.
/// </summary>
public static class AdapterConvert
{
    public static readonly string[] Targets = ["peft-v5", "per-expert", "vllm", "sglang"];

    /// <param name="layout">The adapter's model; null reads it from the adapter's own config when PEFT recorded it.</param>
    public static AdapterFolder Convert(AdapterFolder input, string to, ExpertLayout? layout)
    {
        if (!Targets.Contains(to))
            throw new UserInputException($"--to '{to}': use {string.Join(", ", Targets)}");
        var known = Resolve(input, layout);
        return to switch
        {
            "peft-v5" => ToFused(input, known),
            "per-expert" => ToPerExpert(input, known, oneRankFor: null),
            "vllm" => VllmFormat.Write(input, known),
            _ => SglangFormat.Write(input, known),
        };
    }

    /// <summary>The layout to use: the caller's, else the one the adapter's config names; one-line error when neither.</summary>
    public static ExpertLayout Resolve(AdapterFolder input, ExpertLayout? layout) =>
        layout ?? ExpertLayout.FromAdapterConfig(input.Config) ?? throw new UserInputException(
            "cannot tell which model this adapter is for (its adapter_config.json has no auto_mapping): the expert LoRA's " +
            "gate/up order (halves in most families, interleaved in gpt-oss) and per-expert names depend on it; pass --model MODEL.");

    /// <param name="oneRankFor">When set, the consumer (e.g. "--to vllm") that reads one r and lora_alpha: every pair
    /// is padded to one rank. A per-expert input is fused first, so its names and ranks are rewritten too.</param>
    public static AdapterFolder ToPerExpert(AdapterFolder input, ExpertLayout layout, string? oneRankFor)
    {
        if (oneRankFor is not null && !LoraPairs.Read(input).Pairs.Any(p => p.Parameter is not null && p.Experts > 1))
            input = ToFused(input, layout);
        var (pairs, other) = LoraPairs.Read(input);
        bool rslora = LoraPairs.Bool(input.Config, "use_rslora");
        var outPairs = new List<(string Module, AdapterTensor A, AdapterTensor B, int Rank, double Alpha)>();
        var converted = new HashSet<string>(StringComparer.Ordinal);
        var expertModules = new HashSet<string>(StringComparer.Ordinal);
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
                throw new UserInputException($"{p.Module}.gate_up_proj: lora_B has an odd number of rows ({p.B.Shape[0]}), not gate and up features.");
            converted.Add(p.Module[(p.Module.LastIndexOf('.') + 1)..] + "." + p.Parameter);
            for (int e = 0; e < p.Experts; e++)
            {
                var a = Rows(p.A, e * p.Rank, p.Rank, $"{p.A.Name}[{e}]");
                var b = ExpertColumns(p.B, e, p.Experts, p.Rank);
                // Per-expert LoRAs are nn.Linear LoRAs: A (r, in), B (out, r) of the projection.
                if (layout.PeftDeltaTransposed(p.Module)) (a, b) = (Transpose(b), Transpose(a));
                var parts = p.Parameter == "down_proj"
                    ? new[] { (ExpertRole.Down, b) }
                    : [(ExpertRole.Gate, GateRows(b, layout.Order)), (ExpertRole.Up, UpRows(b, layout.Order))];
                foreach (var (role, half) in parts)
                {
                    string module = layout.ExpertModule(p.Module, e, role);
                    expertModules.Add(module);
                    outPairs.Add((module, a, half, p.Rank, p.Alpha));
                }
            }
        }
        if (converted.Count == 0)
            throw new UserInputException("the adapter has no fused expert LoRA (ParamWrapper on gate_up_proj/down_proj) to convert.");

        var config = (JsonObject)input.Config.DeepClone();
        int r = LoraPairs.Int(config, "r", 8);
        double alpha = LoraPairs.Double(config, "lora_alpha", 8);
        var projections = expertModules.Select(Last).Distinct().ToList();
        if (oneRankFor is not null)
        {
            outPairs = PadToOneRank(outPairs, rslora, config, oneRankFor);
        }
        else
        {
            var rp = config["rank_pattern"] as JsonObject ?? new JsonObject();
            var ap = config["alpha_pattern"] as JsonObject ?? new JsonObject();
            foreach (var key in rp.Select(kv => kv.Key).Where(k => k.Contains("gate_up_proj") || k.Contains("down_proj")).ToList()) rp.Remove(key);
            foreach (var key in ap.Select(kv => kv.Key).Where(k => k.Contains("gate_up_proj") || k.Contains("down_proj")).ToList()) ap.Remove(key);
            foreach (var proj in projections)
            {
                var one = outPairs.Where(p => expertModules.Contains(p.Module) && Last(p.Module) == proj).ToList();
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
        foreach (var proj in projections)
            if (!modules.Contains(proj)) modules.Add(proj);
        config["target_modules"] = new JsonArray(modules.Select(m => (JsonNode)m).ToArray());
        return new AdapterFolder(config, Emit(outPairs.Select(p => (p.Module, p.A, p.B)), other));
    }

    /// <summary>
    /// Pads every pair with zero rank rows (A) and columns (B) to the largest rank, so one <c>r</c> and one
    /// <c>lora_alpha</c> describe them all (for consumers that read no rank_pattern). ΔW is unchanged because the added
    /// terms are exact zeros; it needs one scaling for all pairs.
    /// </summary>
    internal static List<(string Module, AdapterTensor A, AdapterTensor B, int Rank, double Alpha)> PadToOneRank(
        List<(string Module, AdapterTensor A, AdapterTensor B, int Rank, double Alpha)> pairs, bool rslora, JsonObject config, string what)
    {
        if (rslora)
            throw new UserInputException($"{what}: use_rslora adapters cannot be padded to one rank without changing the scaling.");
        var scalings = pairs.Select(p => p.Alpha / p.Rank).Distinct().ToList();
        if (scalings.Count > 1)
            throw new UserInputException($"{what} needs one scaling alpha/r for every LoRA (the consumer reads one r and lora_alpha); this adapter has {string.Join(", ", scalings)}.");
        int maxRank = pairs.Max(p => p.Rank);
        config["r"] = maxRank;
        config["lora_alpha"] = scalings[0] * maxRank;
        config["rank_pattern"] = new JsonObject();
        config["alpha_pattern"] = new JsonObject();
        return pairs.Select(p =>
        {
            int experts = (int)(p.A.Shape[0] / p.Rank);
            return (p.Module, PadRows(p.A, experts, p.Rank, maxRank), PadColumns(p.B, experts, p.Rank, maxRank), maxRank, scalings[0] * maxRank);
        }).ToList();
    }

    public static AdapterFolder ToFused(AdapterFolder input, ExpertLayout layout)
    {
        var (pairs, other) = LoraPairs.Read(input);
        bool rslora = LoraPairs.Bool(input.Config, "use_rslora");
        var located = pairs.Where(p => p.Parameter is null).Select(p => (Pair: p, Where: layout.Locate(p.Module))).ToList();
        var experts = located.Where(x => x.Where is not null).Select(x => (x.Pair, Where: x.Where!.Value)).ToList();
        var keep = located.Where(x => x.Where is null).Select(x => x.Pair).Concat(pairs.Where(p => p.Parameter is not null)).ToList();
        if (experts.Count == 0)
            throw new UserInputException("the adapter has no per-expert LoRA (…experts.<e>.<proj>) to fuse.");
        var outPairs = keep.Select(p => (Module: p.Module, p.Depth, p.A, p.B)).ToList();
        double? gateUpRank = null, gateUpAlpha = null, downRank = null, downAlpha = null;
        foreach (var owner in experts.GroupBy(x => x.Where.Owner).OrderBy(g => g.Key, StringComparer.Ordinal))
        {
            int count = owner.Max(x => x.Where.Expert) + 1;
            var byRole = owner.ToDictionary(x => (x.Where.Expert, x.Where.Role), x => x.Pair);
            bool hasGate = owner.Any(x => x.Where.Role == ExpertRole.Gate), hasUp = owner.Any(x => x.Where.Role == ExpertRole.Up);
            bool hasDown = owner.Any(x => x.Where.Role == ExpertRole.Down);
            if (hasGate != hasUp)
                throw new UserInputException($"{owner.Key}: only the {(hasGate ? "gate" : "up")} projection is adapted; the fused gate_up_proj needs both halves (PEFT raises the same, #3127).");
            var gateUp = new List<(AdapterTensor A, AdapterTensor B)>();
            var fusedDown = new List<(AdapterTensor A, AdapterTensor B)>();
            for (int e = 0; e < count; e++)
            {
                if (hasGate)
                {
                    if (!byRole.TryGetValue((e, ExpertRole.Gate), out var g) || !byRole.TryGetValue((e, ExpertRole.Up), out var u))
                        throw new UserInputException($"{owner.Key}: expert {e} has no gate/up LoRA; the fused format needs every expert.");
                    if (g.Scaling(rslora) != u.Scaling(rslora))
                        throw new UserInputException($"{owner.Key}.{e}: the gate and up LoRAs have different scalings; one fused LoRA has one.");
                    bool sharedA = g.Rank == u.Rank && g.A.Data.AsSpan().SequenceEqual(u.A.Data);
                    if (sharedA)
                    {
                        gateUp.Add((g.A, MergeRows(g.B, u.B, layout.Order)));
                        gateUpRank = g.Rank; gateUpAlpha = g.Alpha;
                    }
                    else
                    {
                        gateUp.Add((StackRows(g.A, u.A), BlockDiagonal(g.B, u.B, layout.Order)));
                        gateUpRank = g.Rank + u.Rank; gateUpAlpha = g.Alpha + u.Alpha;
                    }
                }
                if (byRole.TryGetValue((e, ExpertRole.Down), out var d))
                {
                    fusedDown.Add((d.A, d.B));
                    downRank = d.Rank; downAlpha = d.Alpha;
                }
                else if (hasDown)
                    throw new UserInputException($"{owner.Key}: expert {e} has no down LoRA; the fused format needs every expert.");
            }
            if (layout.PeftDeltaTransposed(owner.Key))
            {
                gateUp = gateUp.Select(x => (Transpose(x.B), Transpose(x.A))).ToList();
                fusedDown = fusedDown.Select(x => (Transpose(x.B), Transpose(x.A))).ToList();
            }
            bool both = gateUp.Count > 0 && fusedDown.Count > 0;
            if (gateUp.Count > 0) outPairs.Add((owner.Key, both ? 1 : 0, StackExpertRows(gateUp.Select(x => x.A).ToList()), InterleaveColumns(gateUp.Select(x => x.B).ToList())));
            if (fusedDown.Count > 0) outPairs.Add((owner.Key, 0, StackExpertRows(fusedDown.Select(x => x.A).ToList()), InterleaveColumns(fusedDown.Select(x => x.B).ToList())));
        }

        var config = (JsonObject)input.Config.DeepClone();
        // The per-expert projection names leave target_modules unless a module that stays (a shared expert) still uses them.
        var moved = experts.Select(x => Last(x.Pair.Module)).ToHashSet(StringComparer.Ordinal);
        var stillUsed = keep.Where(p => p.Parameter is null).Select(p => Last(p.Module)).ToHashSet(StringComparer.Ordinal);
        var modules = LoraPairs.StringList(config, "target_modules").Where(m => !moved.Contains(m) || stillUsed.Contains(m)).ToList();
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

    private static string Last(string module) => module[(module.LastIndexOf('.') + 1)..];

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

    // gate_up_proj's output features: gate then up (halves), or alternating (gpt-oss). B_e rows are output features.
    private static AdapterTensor GateRows(AdapterTensor b, GateUpOrder order) =>
        order == GateUpOrder.Halves ? Rows(b, 0, b.Shape[0] / 2, "") : EveryOtherRow(b, 0);

    private static AdapterTensor UpRows(AdapterTensor b, GateUpOrder order) =>
        order == GateUpOrder.Halves ? Rows(b, b.Shape[0] / 2, b.Shape[0] / 2, "") : EveryOtherRow(b, 1);

    private static AdapterTensor Transpose(AdapterTensor t)
    {
        int es = t.ElementSize; long rows = t.Shape[0], cols = t.Shape[1];
        var data = new byte[t.Data.Length];
        for (long i = 0; i < rows; i++)
            for (long j = 0; j < cols; j++)
                Buffer.BlockCopy(t.Data, (int)((i * cols + j) * es), data, (int)((j * rows + i) * es), es);
        return new AdapterTensor(t.Name, t.Dtype, [cols, rows], data);
    }

    private static AdapterTensor EveryOtherRow(AdapterTensor t, int first)
    {
        int rowBytes = (int)(t.Shape[1] * t.ElementSize);
        long rows = t.Shape[0] / 2;
        var data = new byte[rows * rowBytes];
        for (long i = 0; i < rows; i++) Buffer.BlockCopy(t.Data, (int)((2 * i + first) * rowBytes), data, (int)(i * rowBytes), rowBytes);
        return new AdapterTensor("", t.Dtype, [rows, t.Shape[1]], data);
    }

    /// <summary>The inverse of <see cref="GateRows"/>/<see cref="UpRows"/>: gate and up rows back into gate_up order.</summary>
    private static AdapterTensor MergeRows(AdapterTensor gate, AdapterTensor up, GateUpOrder order)
    {
        if (order == GateUpOrder.Halves) return StackRows(gate, up);
        if (gate.Shape[0] != up.Shape[0] || gate.Shape[1] != up.Shape[1] || gate.Dtype != up.Dtype)
            throw new UserInputException($"gate and up lora_B of shapes {gate.ShapeText} and {up.ShapeText} cannot be interleaved.");
        int rowBytes = (int)(gate.Shape[1] * gate.ElementSize);
        var data = new byte[2 * gate.Data.Length];
        for (long i = 0; i < gate.Shape[0]; i++)
        {
            Buffer.BlockCopy(gate.Data, (int)(i * rowBytes), data, (int)(2 * i * rowBytes), rowBytes);
            Buffer.BlockCopy(up.Data, (int)(i * rowBytes), data, (int)((2 * i + 1) * rowBytes), rowBytes);
        }
        return new AdapterTensor("", gate.Dtype, [2 * gate.Shape[0], gate.Shape[1]], data);
    }

    /// <summary>
    /// B of gate and up LoRAs with their own A, for A = [A_gate; A_up]: gate rows read the first rank columns, up rows
    /// the last ones; rows are placed where the model keeps gate and up features.
    /// </summary>
    private static AdapterTensor BlockDiagonal(AdapterTensor gate, AdapterTensor up, GateUpOrder order)
    {
        if (gate.Shape[0] != up.Shape[0] || gate.Dtype != up.Dtype)
            throw new UserInputException($"gate and up lora_B of shapes {gate.ShapeText} and {up.ShapeText} do not describe one gate_up_proj.");
        int es = gate.ElementSize; long rows = gate.Shape[0], cg = gate.Shape[1], cu = up.Shape[1], cols = cg + cu;
        var data = new byte[2 * rows * cols * es];
        for (long o = 0; o < rows; o++)
        {
            long gateRow = order == GateUpOrder.Halves ? o : 2 * o, upRow = order == GateUpOrder.Halves ? rows + o : 2 * o + 1;
            Buffer.BlockCopy(gate.Data, (int)(o * cg * es), data, (int)(gateRow * cols * es), (int)(cg * es));
            Buffer.BlockCopy(up.Data, (int)(o * cu * es), data, (int)((upRow * cols + cg) * es), (int)(cu * es));
        }
        return new AdapterTensor("", gate.Dtype, [2 * rows, cols], data);
    }

    // A (E·r, in), expert-major: expert e's rows move from e·r to e·R, the rest stays zero.
    private static AdapterTensor PadRows(AdapterTensor a, int experts, int rank, int newRank)
    {
        if (rank == newRank) return a;
        long rowBytes = a.Shape[1] * a.ElementSize;
        var data = new byte[experts * newRank * rowBytes];
        for (int e = 0; e < experts; e++)
            Buffer.BlockCopy(a.Data, (int)(e * rank * rowBytes), data, (int)(e * newRank * rowBytes), (int)(rank * rowBytes));
        return a with { Shape = [experts * newRank, a.Shape[1]], Data = data };
    }

    // B (out, r·E), rank-major: column k·E + e keeps its place (k < r); columns of the added ranks stay zero.
    private static AdapterTensor PadColumns(AdapterTensor b, int experts, int rank, int newRank)
    {
        if (rank == newRank) return b;
        int es = b.ElementSize; long outF = b.Shape[0], cols = (long)rank * experts, newCols = (long)newRank * experts;
        var data = new byte[outF * newCols * es];
        for (long o = 0; o < outF; o++) Buffer.BlockCopy(b.Data, (int)(o * cols * es), data, (int)(o * newCols * es), (int)(cols * es));
        return b with { Shape = [outF, newCols], Data = data };
    }
}
