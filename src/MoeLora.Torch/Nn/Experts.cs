using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>A weight delta added to a 3-D expert parameter while it is used (PEFT's ParamWrapper parametrization).</summary>
public interface IParamDelta
{
    Tensor Delta();

    /// <summary>False while adapters are disabled (the parameter is used unchanged).</summary>
    bool Enabled { get; }
}

/// <summary>A 3-D expert delta in low-rank form: ΔW[e] = L[e] · R[e], L (E, d1, r) with the scaling folded in, R (E, r, d2).</summary>
public interface ILowRankExpertDelta : IParamDelta
{
    (Tensor L, Tensor R) Factors();
}

/// <summary>
/// A module that runs routed experts and knows how many (token, slot) pairs the router sent to each expert in the
/// last forward (the <c>routers</c> command's rows).
/// </summary>
public interface IRoutedExperts
{
    long NumExperts { get; }
    long[]? LastSelectedCounts { get; }

    /// <summary>True for a module run on another's routing (JetMoE's output_linear after its input_linear): its counts repeat that row.</summary>
    bool SharesRouting { get; }
}

/// <summary>How fused experts are computed (see <see cref="ExpertsBase.Dispatching"/>).</summary>
public enum ExpertDispatch
{
    /// <summary>Sorted by expert: grouped matmuls (<see cref="GroupedMm"/>) where they suit the device, else <see cref="Padded"/>.</summary>
    Grouped,
    /// <summary>Sorted by expert, in padded batched matmuls and per-expert segments (<see cref="ExpertCapacity"/>).</summary>
    Padded,
    /// <summary>transformers' per-expert loop over W+ΔW.</summary>
    Loop,
}

/// <summary>
/// Base of the fused-expert modules: holds 3-D expert parameters and applies attached LoRA deltas, with the result
/// of PEFT's parametrization <c>W_eff = W + ΔW</c>: grouped (low-rank, see <see cref="Dispatching"/>) or, in the
/// reference loop, literally.
/// </summary>
public abstract class ExpertsBase : HfModule, IRoutedExperts
{
    readonly Dictionary<string, List<IParamDelta>> _deltas = [];

    /// <summary>
    /// The owner's <c>is_transposed</c> flag as PEFT sees it: true means (E, in, out) and no in/out swap (gpt-oss);
    /// false means PEFT treats the parameter as (E, out, in) (transformers-v5 experts, and Llama4, see there).
    /// </summary>
    public abstract bool IsTransposed { get; }
    public long NumExperts { get; protected init; }
    public virtual bool SharesRouting => false;

    /// <summary>
    /// Identity experts numbered after the <see cref="NumExperts"/> computed ones (LongCat-Flash's zero-computation
    /// experts): the grouping leaves their (token, slot) pairs to the owner, and a parameter with rows for them too
    /// (LongCat's gate_up_proj) is used by its first <see cref="NumExperts"/> rows.
    /// </summary>
    protected long IdentityExperts { get; init; }

    /// <summary>The rows of an expert tensor that belong to computed experts.</summary>
    Tensor Computed(Tensor t) => t.shape[0] == NumExperts ? t : t.narrow(0, 0, NumExperts);

    public Parameter Param(string name) =>
        DirectParameters.FirstOrDefault(kv => kv.Key == name).Value ?? throw new KeyNotFoundException($"experts has no parameter '{name}'.");

    /// <summary>Whether any attached LoRA delta is enabled (the experts then train even where their input needs no gradient).</summary>
    internal bool HasEnabledDeltas => _deltas.Values.Any(l => l.Any(d => d.Enabled));

    /// <summary>
    /// The grouped experts <paramref name="run"/>(x, grouping, topW) on <paramref name="topIdx"/>'s grouping, recomputed
    /// in backward instead of keeping their intermediates (<see cref="ExpertRecompute"/>, which reuses the grouping).
    /// </summary>
    protected Tensor Recomputed(Tensor x, Tensor topIdx, Tensor topW, Func<Tensor, Grouping, Tensor, Tensor> run) =>
        ExpertRecompute.Run(this, x, Group(topIdx), topW, run);

    internal void AttachDelta(string name, IParamDelta d)
    {
        if (!_deltas.TryGetValue(name, out var l)) _deltas[name] = l = [];
        l.Add(d);
    }

    /// <summary>
    /// How the experts run. <see cref="ExpertDispatch.Grouped"/> (default): (token, slot) pairs sorted by expert, each
    /// expert weight applied to its contiguous rows, in one grouped matmul per weight (<see cref="GroupedMm"/>, on the CPU
    /// and on Hopper/Blackwell GPUs in bf16) or else as <see cref="ExpertDispatch.Padded"/> does: padded batched matmuls
    /// (the first for the first rows of every expert, later ones for the busier experts' rows beyond) and one matmul per
    /// expert for what is left (see <see cref="ExpertCapacity"/>). Either way LoRA runs as low-rank products (x·Rᵀ·Lᵀ or
    /// x·L·R) without materialising W+ΔW.
    /// <see cref="ExpertDispatch.Loop"/>: transformers' per-expert loop over W+ΔW (PEFT's parametrization, kept as
    /// the reference for tests).
    /// </summary>
    public ExpertDispatch Dispatching { get; set; } = ExpertDispatch.Grouped;

    /// <summary>
    /// The padded batched matmul takes at most this factor of the routed pairs in rows (E × capacity), or
    /// <see cref="FreePaddedRows"/> where that is more; 0 (with no free rows) runs every expert as its own segment.
    /// Null (default): by device, see <see cref="ExpertCapacity.Defaults"/>.
    /// </summary>
    public double? MaxPaddingFactor { get; set; }

    /// <summary>What one more per-expert segment costs, in padded rows. Null (default): by device, see <see cref="ExpertCapacity.Defaults"/>.</summary>
    public double? SegmentCostRows { get; set; }

    /// <summary>Padded rows allowed whatever the routed pairs (E × capacity up to this many). Null (default): by device, see <see cref="ExpertCapacity.Defaults"/>.</summary>
    public long? FreePaddedRows { get; set; }

    /// <summary>Tests: every tier's capacity, whatever <see cref="ExpertCapacity"/> would choose (capped at the busiest expert's rows left).</summary>
    internal long? ForcedCapacity { get; set; }

    protected Tensor Effective(string name)
    {
        Tensor w = Param(name);
        if (!_deltas.TryGetValue(name, out var l)) return w;
        foreach (var d in l) if (d.Enabled) w = w + d.Delta().to(w.dtype);
        return w;
    }

    /// <summary>
    /// How many (token, slot) pairs the router sent to each expert in the last forward: the experts actually
    /// dispatched (after any bias/group selection), for gradient-flow checks.
    /// </summary>
    public long[]? LastSelectedCounts
    {
        get
        {
            if (_lastCountsHost is null && _lastCounts is { } t)
            {
                _lastCountsHost = t.data<long>().ToArray();
                t.Dispose();
                _lastCounts = null;
            }
            return _lastCountsHost;
        }
        protected set
        {
            _lastCounts?.Dispose();
            _lastCounts = null;
            _lastCountsHost = value;
        }
    }

    long[]? _lastCountsHost;
    Tensor? _lastCounts;

    /// <summary>
    /// The counts of grouping <paramref name="g"/> as <see cref="LastSelectedCounts"/>: kept on the device and read to the
    /// host only when asked for, unless the grouping already read them.
    /// </summary>
    protected void SetLastCounts(Grouping g)
    {
        LastSelectedCounts = g.Tiers.Count > 0 || g.Overflow.Count > 0 ? g.Counts : null;
        if (_lastCountsHost is null) _lastCounts = g.CountsTensor.detach().DetachFromDisposeScope();
    }

    /// <summary>The experts' dtype (that of their first parameter).</summary>
    ScalarType ExpertsDType => DirectParameters.First().Value.dtype;

    /// <summary>Every K and N the grouped experts multiply: the 3-D parameters' last two sizes (LoRA ranks are padded, see LowRank).</summary>
    IEnumerable<long> GroupedWidths() =>
        DirectParameters.Select(kv => kv.Value).Where(p => p.dim() == 3).SelectMany(p => new[] { p.shape[1], p.shape[2] });

    /// <summary>
    /// The T·k (token, slot) pairs sorted by expert: <see cref="Order"/> (pair index per sorted row), its token, the
    /// per-expert counts, and how they run (see <see cref="ExpertCapacity"/>): <see cref="Tiers"/>, padded batched
    /// matmuls each taking some rows of some experts, then <see cref="Overflow"/>, per expert a contiguous run of sorted
    /// rows in its own matmuls. <see cref="Assemble"/> (when there is more than one part) is the sorted row of each
    /// output row once the tiers' rows and then the overflow runs are concatenated. With <see cref="Offsets"/> (the
    /// experts' cumulative row ends, int32) the sorted rows run in grouped matmuls instead (<see cref="GroupedMm"/>):
    /// no tiers, no overflow, and <see cref="ExpertOf"/> is each sorted row's expert.
    /// </summary>
    protected internal sealed record Grouping(Tensor Order, Tensor TokenOf, Tensor CountsTensor, IReadOnlyList<PaddedTier> Tiers,
        IReadOnlyList<(long Expert, long Start, long Length)> Overflow, Tensor? Assemble, Tensor? Offsets = null, Tensor? ExpertOf = null) : IDisposable
    {
        long[]? _counts;

        /// <summary>The per-expert counts on the host: read from the device (a synchronisation) the first time unless given.</summary>
        public long[] Counts
        {
            get => _counts ??= CountsTensor.data<long>().ToArray();
            init => _counts = value;
        }

        IEnumerable<Tensor> Tensors => new[] { Order, TokenOf, CountsTensor, Assemble, Offsets, ExpertOf }
            .Concat(Tiers.SelectMany(t => new[] { t.Experts, t.Row, t.Sorted })).OfType<Tensor>();

        /// <summary>Takes the grouping's tensors out of the current dispose scope (kept for a recompute in backward).</summary>
        public Grouping Detached()
        {
            foreach (var t in Tensors) t.DetachFromDisposeScope();
            return this;
        }

        public void Dispose()
        {
            foreach (var t in Tensors) t.Dispose();
        }
    }

    /// <summary>
    /// One padded batched matmul over <see cref="ExpertCount"/> experts of <see cref="Capacity"/> rows each:
    /// <see cref="Experts"/> are the experts whose weights it gathers (null: every computed expert, in order),
    /// <see cref="Row"/> each of its rows' place in the buffer [ExpertCount·Capacity], <see cref="Sorted"/> which sorted
    /// rows they are (null: all of them, in order).
    /// </summary>
    protected internal sealed record PaddedTier(long Capacity, long ExpertCount, Tensor? Experts, Tensor Row, Tensor? Sorted);

    /// <summary>
    /// Sorts the pairs by expert (stable: token-major within an expert, as the loop); pairs of identity experts are left
    /// out (<see cref="Grouping.Order"/> still indexes the flattened [T·k] pairs).
    /// </summary>
    protected internal Grouping Group(Tensor topIdx)
    {
        long k = topIdx.shape[1];
        using var _ = no_grad();
        var flat = topIdx.flatten();
        Tensor? kept = null;
        if (IdentityExperts > 0)
        {
            kept = flat.lt(NumExperts).nonzero().flatten();
            flat = flat.index_select(0, kept);
        }
        long n = flat.shape[0];
        var counts = ExpertCounts.OnDevice(flat, NumExperts); // no host read here (see ExpertCounts)
        var (sorted, order) = flat.sort(0, false, true);
        if (kept is not null) order = kept.index_select(0, order);
        var tokenOf = order.div(k, rounding_mode: RoundingMode.floor);
        if (Dispatching == ExpertDispatch.Grouped && n > 0 && GroupedMm.Suits(flat.device, ExpertsDType, GroupedWidths()))
        {
            // No host read: the counts are read only if someone asks for them (LastSelectedCounts).
            var grouped = new Grouping(order, tokenOf, counts, [], [], null, counts.cumsum(0).to(ScalarType.Int32), sorted);
            SetLastCounts(grouped);
            Runtime.MemTrace.CountDispatch(0, 0, 0, n, groupedMm: true);
            return grouped;
        }
        var c = counts.data<long>().ToArray();

        var (segmentCost, maxPadding, freeRows) = ExpertCapacity.Defaults(flat.device);
        var (plan, segments) = ExpertCapacity.Plan(c, SegmentCostRows ?? segmentCost, MaxPaddingFactor ?? maxPadding,
            FreePaddedRows ?? freeRows, ForcedCapacity);
        var firstRow = new long[c.Length];
        for (int e = 1; e < c.Length; e++) firstRow[e] = firstRow[e - 1] + c[e - 1];
        var overflow = segments.Select(s => (s.Expert, firstRow[s.Expert] + s.Start, s.Length)).ToList();
        LastSelectedCounts = c;
        Runtime.MemTrace.CountDispatch(plan.Sum(t => t.Experts * t.Capacity), plan.Count, overflow.Count, n);
        if (plan.Count == 0) return new Grouping(order, tokenOf, counts, [], overflow, null) { Counts = c };

        var starts = counts.cumsum(0) - counts;
        var local = arange(n, ScalarType.Int64, flat.device) - starts.index_select(0, sorted); // place within its expert
        if (plan.Count == 1 && overflow.Count == 0)
            return new Grouping(order, tokenOf, counts, [new PaddedTier(plan[0].Capacity, NumExperts, null, sorted * plan[0].Capacity + local, null)], overflow, null) { Counts = c };

        // Each sorted row's part: the number of tiers that end at or before its place within its expert (the overflow
        // runs, after every tier, get the count of tiers). A stable sort on it lists the tiers' rows tier by tier and then
        // the overflow runs, each in sorted order (so the runs come expert by expert, as Overflow lists them): that order
        // is Assemble, without a host read.
        var part = zeros_like(local);
        foreach (var t in plan) part = part + local.ge(t.Offset + t.Capacity).to(ScalarType.Int64);
        var (_, assemble) = part.sort(0, false, true);
        var tiers = new List<PaddedTier>();
        long before = 0;
        foreach (var t in plan)
        {
            var sel = assemble.narrow(0, before, t.Rows);
            before += t.Rows;
            var expert = sorted.index_select(0, sel);
            var within = local.index_select(0, sel) - t.Offset;
            if (t.Offset == 0)
            {
                tiers.Add(new PaddedTier(t.Capacity, NumExperts, null, expert * t.Capacity + within, sel));
                continue;
            }
            // A later tier holds the experts with more than Offset rows, in order: each one's slot is its rank among them.
            var member = counts.gt(t.Offset);
            var slot = member.to(ScalarType.Int64).cumsum(0) - 1;
            var (_, byMembership) = member.logical_not().to(ScalarType.Int64).sort(0, false, true);
            tiers.Add(new PaddedTier(t.Capacity, t.Experts, byMembership.narrow(0, 0, t.Experts),
                slot.index_select(0, expert) * t.Capacity + within, sel));
        }
        return new Grouping(order, tokenOf, counts, tiers, overflow, assemble) { Counts = c };
    }

    /// <summary>
    /// The expert computation on one group of rows: <see cref="Mm"/> applies an expert weight (plus its enabled LoRA
    /// deltas as low-rank products), <see cref="Bias"/> gives an expert bias broadcastable to Mm's output. Batched
    /// (padded [E, cap, ·] rows, one bmm per weight) or for one expert's contiguous rows ([n_e, ·], plain matmuls).
    /// </summary>
    protected abstract class ExpertOps
    {
        /// <summary>
        /// <c>x · W[e]ᵀ</c> with <paramref name="transposeWeight"/> ((E, out, in) weights used as nn.functional.linear,
        /// the transformers-v5 experts) or <c>x · W[e]</c> (gpt-oss, Llama4), plus each enabled LoRA delta
        /// ΔW[e] = L[e]·R[e] as <c>x · Rᵀ · Lᵀ</c> or <c>x · L · R</c>.
        /// </summary>
        public abstract Tensor Mm(Tensor x, string name, bool transposeWeight);
        public abstract Tensor Bias(string name);
    }

    /// <summary>One tier's experts: every computed expert (<paramref name="experts"/> null) or those it gathers.</summary>
    sealed class BatchedOps(ExpertsBase owner, ScalarType dtype, Tensor? experts) : ExpertOps
    {
        Tensor Pick(Tensor t) => experts is null ? owner.Computed(t) : t.index_select(0, experts);

        public override Tensor Mm(Tensor x, string name, bool transposeWeight)
        {
            var w = Pick(owner.Param(name));
            var y = bmm(x, transposeWeight ? w.transpose(1, 2) : w);
            foreach (var (fl, fr) in owner.Factors(name, dtype))
            {
                var (l, r) = (Pick(fl), Pick(fr));
                y = y + (transposeWeight ? bmm(bmm(x, r.transpose(1, 2)), l.transpose(1, 2)) : bmm(bmm(x, l), r));
            }
            return y;
        }
        public override Tensor Bias(string name) => Pick(owner.Effective(name)).unsqueeze(1);
    }

    /// <summary>Every sorted row at once, each expert's weight applied to its rows by <see cref="GroupedMm"/>.</summary>
    sealed class GroupedMmOps(ExpertsBase owner, ScalarType dtype, Tensor offsets, Tensor expertOf) : ExpertOps
    {
        Tensor Gmm(Tensor x, Tensor w) => GroupedMm.Run(x, w, offsets);

        public override Tensor Mm(Tensor x, string name, bool transposeWeight)
        {
            var w = owner.Computed(owner.Param(name));
            var y = Gmm(x, transposeWeight ? w.transpose(1, 2) : w);
            foreach (var (fl, fr) in owner.Factors(name, dtype))
            {
                var (l, r) = (owner.Computed(fl), owner.Computed(fr));
                y = y + (transposeWeight ? Gmm(Gmm(x, r.transpose(1, 2)), l.transpose(1, 2)) : Gmm(Gmm(x, l), r));
            }
            return y;
        }
        public override Tensor Bias(string name) => owner.Computed(owner.Effective(name)).index_select(0, expertOf);
    }

    sealed class SingleExpertOps(ExpertsBase owner, ScalarType dtype) : ExpertOps
    {
        public long Expert;
        public override Tensor Mm(Tensor x, string name, bool transposeWeight)
        {
            var w = owner.Param(name)[Expert];
            var y = transposeWeight ? nn.functional.linear(x, w) : matmul(x, w);
            foreach (var (l, r) in owner.Factors(name, dtype))
                y = y + (transposeWeight ? matmul(matmul(x, r[Expert].t()), l[Expert].t()) : matmul(matmul(x, l[Expert]), r[Expert]));
            return y;
        }
        public override Tensor Bias(string name) => owner.Effective(name)[Expert];
    }

    readonly Dictionary<string, List<(Tensor L, Tensor R)>> _factors = [];

    List<(Tensor L, Tensor R)> Factors(string name, ScalarType dtype)
    {
        if (!_factors.TryGetValue(name, out var f)) _factors[name] = f = EnabledDeltas(name).Select(d => LowRank(d, dtype)).ToList();
        return f;
    }

    /// <summary>
    /// Runs <paramref name="body"/> (the expert MLP written once against <see cref="ExpertOps"/>) on the sorted rows
    /// [n, in] → [n, out]: batched on each tier's padded buffer for the rows in <see cref="Grouping.Tiers"/>, once per
    /// expert on its contiguous rows for the <see cref="Grouping.Overflow"/> beyond them.
    /// </summary>
    protected Tensor RunExperts(Grouping g, Tensor rows, Func<ExpertOps, Tensor, Tensor> body)
    {
        _factors.Clear(); // LoRA factors (L, R) are computed once per forward and shared by all experts
        try
        {
            if (g.Offsets is { } offsets) return body(new GroupedMmOps(this, rows.dtype, offsets, g.ExpertOf!), rows);
            var parts = new List<Tensor>();
            foreach (var tier in g.Tiers)
            {
                var src = tier.Sorted is { } sel ? rows.index_select(0, sel) : rows;
                var xin = zeros([tier.ExpertCount * tier.Capacity, rows.shape[1]], rows.dtype, rows.device).index_copy(0, tier.Row, src)
                    .view(tier.ExpertCount, tier.Capacity, rows.shape[1]);
                var y = body(new BatchedOps(this, rows.dtype, tier.Experts), xin);
                parts.Add(y.reshape(-1, y.shape[2]).index_select(0, tier.Row));
            }
            var ops = new SingleExpertOps(this, rows.dtype);
            foreach (var (e, start, length) in g.Overflow)
            {
                ops.Expert = e;
                parts.Add(body(ops, rows.narrow(0, start, length)));
            }
            var all = parts.Count == 1 ? parts[0] : cat(parts, 0);
            // The tiers' rows then the overflow runs, back in sorted order (alone, a tier's rows or the runs already are).
            return g.Assemble is { } at ? zeros([rows.shape[0], all.shape[1]], all.dtype, all.device).index_copy(0, at, all) : all;
        }
        finally { _factors.Clear(); }
    }

    IEnumerable<IParamDelta> EnabledDeltas(string name) =>
        _deltas.TryGetValue(name, out var l) ? l.Where(d => d.Enabled) : [];

    static (Tensor L, Tensor R) LowRank(IParamDelta d, ScalarType dtype)
    {
        if (d is not ILowRankExpertDelta lr) throw new NotSupportedException($"{d.GetType().Name} has no low-rank form; use ExpertDispatch.Loop.");
        var (l, r) = lr.Factors();
        // Contiguous: grouped_mm takes a weight whose last two dimensions are row- or column-major, which B's permuted
        // view (expert-minor in PEFT's layout) is not; the factors are small (E·r·(in+out) values). The rank is padded
        // with zeros to a multiple of 8, as grouped_mm's rows of 16 bytes need: the products gain exact zeros only.
        l = l.to(dtype).contiguous();
        r = r.to(dtype).contiguous();
        long pad = (8 - l.shape[2] % 8) % 8;
        return pad == 0 ? (l, r) : (nn.functional.pad(l, [0, pad]), nn.functional.pad(r, [0, 0, 0, pad]));
    }

    /// <summary>(expert, tokens, top-k slot) for each expert hit, like transformers' <c>torch.where(expert_mask[e])</c>.</summary>
    protected IEnumerable<(long Expert, Tensor Tokens, Tensor Slots)> Dispatch(Tensor topIdx, long numExperts)
    {
        // Identity experts (ids numExperts and up) are counted, then dropped: their pairs are not dispatched.
        var counts = ExpertCounts.Read(topIdx, numExperts + IdentityExperts).Take((int)numExperts).ToArray();
        LastSelectedCounts = counts;
        for (long e = 0; e < numExperts; e++)
        {
            if (counts[e] == 0) continue;
            var where = topIdx.eq(e).nonzero();            // [n, 2] rows (token, slot), token-major
            yield return (e, where[.., 0], where[.., 1]);
        }
    }
}

/// <summary>
/// transformers-v5 fused experts (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3): <c>gate_up_proj [E, 2I, H]</c>
/// (rows [0,I) gate, [I,2I) up) and <c>down_proj [E, H, I]</c>, per expert <c>down(act(gate) * up) * w</c>,
/// summed per token in the weighted outputs' dtype and cast once, as transformers' default grouped_mm does (its eager loop
/// instead adds each expert's share in the model dtype). With Z identity experts (LongCat-Flash's <c>LongcatFlashExperts</c>)
/// gate_up_proj has E + Z rows, an <c>identity_expert</c> module follows act_fn, and a token routed to expert e ≥ E
/// adds <c>x · w</c>.
/// </summary>
public sealed class FusedExperts : ExpertsBase
{
    readonly Activation _act;
    public override bool IsTransposed => false;

    public FusedExperts(long experts, long hidden, long intermediate, string act, Init init, long identityExperts = 0)
    {
        NumExperts = experts;
        IdentityExperts = identityExperts;
        AddParameter("gate_up_proj", init.Normal(experts + identityExperts, 2 * intermediate, hidden));
        AddParameter("down_proj", init.Normal(experts, hidden, intermediate));
        _act = AddChild("act_fn", new Activation(act));
        if (identityExperts > 0) AddChild("identity_expert", new Container());
    }

    /// <param name="x">[T, H]</param><param name="topIdx">[T, k] int64</param><param name="topW">[T, k]</param>
    public Tensor Forward(Tensor x, Tensor topIdx, Tensor topW)
    {
        var routed = Dispatching == ExpertDispatch.Loop ? ForwardLoop(x, topIdx, topW) : Recomputed(x, topIdx, topW, ForwardGrouped);
        if (IdentityExperts == 0) return routed;
        // The identity experts' share: each token times the summed weights of its slots routed to them.
        var identityW = topW.masked_fill(topIdx.lt(NumExperts), 0).sum(-1, keepdim: true);
        return routed + (x * identityW).to(x.dtype);
    }

    Tensor ForwardGrouped(Tensor x, Grouping g, Tensor topW)
    {
        if (g.TokenOf.shape[0] == 0) return zeros_like(x); // every pair went to an identity expert
        var h = RunExperts(g, x.index_select(0, g.TokenOf), (ops, xe) =>
        {
            var gu = ops.Mm(xe, "gate_up_proj", transposeWeight: true).chunk(2, -1);
            return ops.Mm(_act.Forward(gu[0]) * gu[1], "down_proj", transposeWeight: true);
        });
        var w = topW.flatten().index_select(0, g.Order).unsqueeze(-1);
        // transformers' default experts implementation (grouped_mm) sums each token's k weighted outputs in their
        // own dtype and casts once: fp32 where the routing weights are fp32 (DeepSeek-V3's router and its kin keep
        // them so), not k bf16 roundings as its eager loop's index_add. Summing these in bf16 put dots1's bf16 logits
        // 0.16 from fp32 where transformers' are 0.012.
        var hw = h * w;
        return zeros(x.shape, hw.dtype, x.device).index_add(0, g.TokenOf, hw, 1.0).to(x.dtype);
    }

    Tensor ForwardLoop(Tensor x, Tensor topIdx, Tensor topW)
    {
        var gateUp = Effective("gate_up_proj");
        var down = Effective("down_proj");
        // Summed in the weighted outputs' dtype like the grouped path (transformers runs grouped_mm by default).
        Tensor? final = null;
        foreach (var (e, tok, slot) in Dispatch(topIdx, NumExperts))
        {
            var cur = x.index_select(0, tok);
            var gu = nn.functional.linear(cur, gateUp[e]).chunk(2, -1);
            var h = nn.functional.linear(_act.Forward(gu[0]) * gu[1], down[e]);
            var w = topW.index(TensorIndex.Tensor(tok), TensorIndex.Tensor(slot)).unsqueeze(-1);
            var hw = h * w;
            final = (final ?? zeros(x.shape, hw.dtype, x.device)).index_add(0, tok, hw, 1.0);
        }
        return final is null ? zeros_like(x) : final.to(x.dtype);
    }
}

/// <summary>Router holding one <c>weight [E, H]</c> (transformers-v5 <c>XTopKRouter</c>): returns raw logits.</summary>
public sealed class RouterWeight : HfModule
{
    public Parameter weight { get; }
    public Parameter? bias { get; }
    readonly List<IParamDelta> _deltas = [];
    public RouterWeight(long experts, long hidden, Init init, bool hasBias = false)
    {
        weight = AddParameter("weight", init.Normal(experts, hidden));
        if (hasBias) bias = AddParameter("bias", init.Normal(experts));
    }
    /// <summary>Attaches a 2-D ParamWrapper delta to <c>weight</c> (target_parameters on the router).</summary>
    internal void AttachDelta(IParamDelta d) => _deltas.Add(d);
    public Tensor EffectiveWeight() => ParamDeltas.Apply(weight, _deltas);
    public Tensor Logits(Tensor x) => nn.functional.linear(x, EffectiveWeight(), bias);
}
