using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// <c>JetMoeParallelExperts</c>: one weight <c>[E, out, in]</c>, applied per expert as nn.functional.linear to that
/// expert's contiguous rows (PEFT's <c>target_parameters</c> sees it as (E, out, in), like the transformers-5 experts).
/// Several of these share one routing, so the grouping is made once by the caller and passed in.
/// </summary>
public sealed class ParallelExperts : ExpertsBase
{
    readonly bool _sharesRouting;
    public override bool IsTransposed => false;
    public override bool SharesRouting => _sharesRouting;

    /// <param name="sharesRouting">output_linear: run on the routing its input_linear made.</param>
    public ParallelExperts(long experts, long inFeatures, long outFeatures, Init init, bool sharesRouting = false)
    {
        NumExperts = experts; _sharesRouting = sharesRouting;
        AddParameter("weight", init.Normal(experts, outFeatures, inFeatures));
    }

    /// <summary>Rows sorted by expert as <paramref name="g"/> sorts them, [n, in] → [n, out] (JetMoeParallelExperts.forward).</summary>
    internal Tensor Forward(Grouping g, Tensor rows)
    {
        SetLastCounts(g);
        if (Dispatching != ExpertDispatch.Loop) return RunExperts(g, rows, (ops, x) => ops.Mm(x, "weight", transposeWeight: true));
        var w = Effective("weight");
        var parts = rows.split(g.Counts, 0);
        return cat(Enumerable.Range(0, g.Counts.Length).Select(e => nn.functional.linear(parts[e], w[e])).ToList(), 0);
    }
}

/// <summary>
/// <c>JetMoeTopKGating</c>: an nn.Linear <c>layer</c>; top-k of its fp32 logits, softmax over those k in fp32, cast to
/// the hidden dtype (<see cref="RoutedMoe.TopKOfLogits"/>). Returns the fp32 logits as transformers records them.
/// </summary>
public sealed class TopKGating : HfModule
{
    readonly TopKLogitsRouterSettings _s;
    public Linear layer { get; }

    public TopKGating(long hidden, TopKLogitsRouterSettings s, Init init)
    {
        _s = s;
        layer = AddChild("layer", new Linear(hidden, s.NumExperts, false, init));
    }

    public (Tensor Logits, Tensor TopIdx, Tensor TopW) Route(Tensor flat) => RoutedMoe.TopKOfLogits(_s, layer.Forward(flat), flat.dtype);
}

/// <summary>
/// <c>JetMoeMoE</c> (<see cref="ParallelExpertsMoeSettings"/>): per selected expert <c>output_linear(act(gate) · up)</c>
/// with (gate | up) = <c>input_linear(x)</c>, weighted by the gate, summed per token, plus the output bias.
/// </summary>
public sealed class JetMoeMoe : HfModule, IBlock
{
    readonly Parameter _bias;
    readonly Activation _act;
    readonly ParallelExperts _in, _out;
    readonly TopKGating _router;

    public JetMoeMoe(long hidden, ParallelExpertsMoeSettings s, Init init)
    {
        _bias = AddParameter("bias", init.Zeros(hidden));
        _act = AddChild("activation", new Activation(s.Act));
        _in = AddChild("input_linear", new ParallelExperts(s.Router.NumExperts, hidden, 2 * s.Intermediate, init));
        _out = AddChild("output_linear", new ParallelExperts(s.Router.NumExperts, s.Intermediate, hidden, init, sharesRouting: true));
        _router = AddChild("router", new TopKGating(hidden, s.Router, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var shape = x.shape;
        var flat = x.reshape(-1, shape[^1]);
        var (logits, topIdx, topW) = _router.Route(flat);
        ctx.RouterLogits.Add(logits);
        var g = _in.Group(topIdx);
        var gateUp = _in.Forward(g, flat.index_select(0, g.TokenOf)).chunk(2, -1);
        var y = _out.Forward(g, _act.Forward(gateUp[0]) * gateUp[1]);
        var w = topW.flatten().index_select(0, g.Order).unsqueeze(-1);
        return zeros_like(flat).index_add(0, g.TokenOf, (y * w).to(x.dtype), 1.0).view(shape) + _bias;
    }
}

/// <summary>
/// <c>JetMoeMoA</c>: the attention experts. <see cref="Map"/> routes each token to k experts and returns their query
/// projections in (token, slot) order; <see cref="Reduce"/> sends each slot's attention output through the same
/// expert's output projection, weights it by the gate, sums per token and adds the bias.
/// </summary>
public sealed class JetMoeMoA : HfModule
{
    readonly Parameter _bias;
    readonly ParallelExperts _in, _out;
    readonly TopKGating _router;
    readonly long _topK, _width;

    /// <summary>One forward's routing, shared by <see cref="Map"/> and <see cref="Reduce"/> (transformers' topo_info).</summary>
    internal sealed record Routing(ExpertsBase.Grouping Groups, Tensor TopW, Tensor Logits);

    public JetMoeMoA(long hidden, MixtureOfAttentionHeadsSettings s, Init init)
    {
        _topK = s.Router.TopK;
        _width = s.KvHeads * s.HeadDim;
        _bias = AddParameter("bias", init.Zeros(hidden));
        _in = AddChild("input_linear", new ParallelExperts(s.Router.NumExperts, hidden, _width, init));
        _out = AddChild("output_linear", new ParallelExperts(s.Router.NumExperts, _width, hidden, init, sharesRouting: true));
        _router = AddChild("router", new TopKGating(hidden, s.Router, init));
    }

    /// <summary>[B, S, H] → queries [B, S, k, kv·d] (JetMoeMoA.map).</summary>
    internal (Tensor Queries, Routing Routing) Map(Tensor x)
    {
        long b = x.shape[0], s = x.shape[1];
        var flat = x.reshape(-1, x.shape[^1]);
        var (logits, topIdx, topW) = _router.Route(flat);
        var g = _in.Group(topIdx);
        var y = _in.Forward(g, flat.index_select(0, g.TokenOf));
        var q = zeros([b * s * _topK, _width], y.dtype, y.device).index_copy(0, g.Order, y);
        return (q.view(b, s, _topK, _width), new Routing(g, topW, logits));
    }

    /// <summary>[B, S, k, kv·d] → [B, S, H] (JetMoeMoA.reduce).</summary>
    internal Tensor Reduce(Tensor o, Routing r)
    {
        var shape = o.shape;
        var rows = o.reshape(-1, _width).index_select(0, r.Groups.Order);
        var y = _out.Forward(r.Groups, rows);
        var w = r.TopW.flatten().index_select(0, r.Groups.Order).unsqueeze(-1);
        var summed = zeros([shape[0] * shape[1], y.shape[1]], o.dtype, o.device).index_add(0, r.Groups.TokenOf, (y * w).to(o.dtype), 1.0);
        return summed.view(shape[0], shape[1], -1) + _bias;
    }
}

/// <summary>
/// <c>JetMoeAttention</c> (<see cref="MixtureOfAttentionHeadsSettings"/>): k·kv query heads from the attention experts,
/// keys and values from the shared kv_proj, rope by rotating halves, keys and values tiled k times along the heads
/// (<c>repeat(1, top_k, 1, 1)</c>), eager softmax in fp32 with scale head_dim^-0.5, then the experts' reduce.
/// </summary>
public sealed class JetMoeAttention : HfModule, IBlock
{
    readonly JetMoeMoA _experts;
    readonly Linear _kv;
    readonly MixtureOfAttentionHeadsSettings _s;
    readonly Rotary _rope;

    public JetMoeAttention(long hidden, MixtureOfAttentionHeadsSettings s, Rotary rope, Init init)
    {
        _s = s; _rope = rope;
        _experts = AddChild("experts", new JetMoeMoA(hidden, s, init));
        _kv = AddChild("kv_proj", new Linear(hidden, 2 * s.KvHeads * s.HeadDim, false, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1], d = _s.HeadDim, k = _s.Router.TopK;
        var (queries, routing) = _experts.Map(x);
        // transformers records the gating's logits, then the same tensor again as the attention's third output.
        ctx.RouterLogits.Add(routing.Logits);
        var kv = _kv.Forward(x).chunk(2, -1);
        var q = queries.view(b, s, -1, d).transpose(1, 2);
        var key = kv[0].view(b, s, -1, d).transpose(1, 2);
        var value = kv[1].view(b, s, -1, d).transpose(1, 2);
        var rotation = _rope.Half(ctx, ctx.DType);
        q = rotation.Apply(q);
        key = rotation.Apply(key);
        // Query head j (slot j / kv, head j mod kv) reads kv head j mod kv: tiling, not GQA's interleaved repeat.
        key = key.repeat(1, k, 1, 1);
        value = value.repeat(1, k, 1, 1);
        // Through the context's implementation, as transformers' JetMoeAttention uses its attention interface (SDPA by
        // default): in bf16, eager's scores are rounded to bf16 before the softmax and SDPA's are not.
        var o = AttentionMath.Attend(q, key, value, ctx, MaskSettings.Full, Math.Pow(d, -0.5));
        ctx.RouterLogits.Add(routing.Logits);
        return _experts.Reduce(o.view(b, s, k, -1), routing);
    }
}
