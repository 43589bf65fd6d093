using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// <c>DbrxAttention</c> (<see cref="FusedQkvAttentionSettings"/>): <c>Wqkv</c>, clamp to ±clip_qkv, split into q
/// (hidden), k and v (kv·d each), rope by rotating halves, attention under the context's implementation (SDPA unless
/// eager is asked for, as transformers 5.17's DbrxAttention goes through its attention interface), <c>out_proj</c>.
/// </summary>
public sealed class FusedQkvAttention : HfModule, IBlock
{
    readonly Linear _qkv, _out;
    readonly FusedQkvAttentionSettings _s;
    readonly Rotary _rope;
    readonly long _hidden;

    public FusedQkvAttention(long hidden, FusedQkvAttentionSettings s, Rotary rope, Init init)
    {
        _s = s; _rope = rope; _hidden = hidden;
        _qkv = AddChild("Wqkv", new Linear(hidden, hidden + 2 * s.KvHeads * s.HeadDim, false, init));
        _out = AddChild("out_proj", new Linear(hidden, hidden, false, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1], d = _s.HeadDim, kvWidth = _s.KvHeads * d;
        var qkv = _qkv.Forward(x);
        if (_s.ClipQkv is { } clip) qkv = qkv.clamp(-clip, clip);
        var parts = qkv.split([_hidden, kvWidth, kvWidth], -1);
        var q = parts[0].view(b, s, -1, d).transpose(1, 2);
        var k = parts[1].view(b, s, -1, d).transpose(1, 2);
        var v = parts[2].view(b, s, -1, d).transpose(1, 2);
        var rotation = _rope.Half(ctx, ctx.DType);
        q = rotation.Apply(q);
        k = rotation.Apply(k);
        return _out.Forward(AttentionMath.Attend(q, k, v, ctx, MaskSettings.Full, Math.Pow(d, -0.5)));
    }
}

/// <summary>
/// <c>DbrxFFN</c> (<see cref="StackedExpertsMoeSettings"/>): <c>router.layer</c> logits, softmax in their dtype, top-k,
/// divided by the p-norm of the k (<c>moe_normalize_expert_weights</c>), then <c>experts.mlp</c>.
/// </summary>
public sealed class StackedExpertsMoe : HfModule, IBlock
{
    readonly Linear _router;
    readonly StackedGluExperts _experts;
    readonly StackedExpertsMoeSettings _s;

    public StackedExpertsMoe(long hidden, StackedExpertsMoeSettings s, Init init)
    {
        _s = s;
        _router = AddChild("router", new Container()).Add("layer", new Linear(hidden, s.NumExperts, false, init));
        _experts = AddChild("experts", new Container()).Add("mlp", new StackedGluExperts(hidden, s, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var shape = x.shape;
        var flat = x.reshape(-1, shape[^1]);
        var logits = _router.Forward(flat);
        // transformers 5.17 does not return DBRX's router logits (no recorder for them); they are kept here alike.
        ctx.RouterLogits.Add(logits);
        var (topW, topIdx) = logits.softmax(1).topk((int)_s.TopK, -1);
        if (_s.NormalizeP is { } p) topW = topW / topW.norm(-1, true, (float)p);
        return _experts.Forward(flat, topIdx, topW).view(shape);
    }
}

/// <summary>
/// <c>DbrxExpertGLU</c> run as <c>DbrxExperts</c> runs it: <c>w1</c>, <c>v1</c>, <c>w2</c> [E·I, H], expert e using
/// rows [e·I, (e+1)·I): <c>(act(x·w1ₑᵀ) · x·v1ₑᵀ) · w2ₑ</c>, weighted, accumulated in expert order. A PEFT
/// ParamWrapper on one of them is a rank-r update of the whole stacked matrix; it is applied as low-rank products on
/// each expert's rows of B (never forming W + ΔW).
/// </summary>
public sealed class StackedGluExperts : HfModule, IParamDeltaOwner, IRoutedExperts
{
    readonly Parameter _w1, _v1, _w2;
    readonly Activation _act;
    readonly long _experts, _inter;
    readonly Dictionary<string, List<IParamDelta>> _deltas = [];

    public long NumExperts => _experts;
    public long[]? LastSelectedCounts { get; private set; }
    public bool SharesRouting => false;

    public StackedGluExperts(long hidden, StackedExpertsMoeSettings s, Init init)
    {
        _experts = s.NumExperts; _inter = s.Intermediate;
        _w1 = AddParameter("w1", init.Normal(s.NumExperts * s.Intermediate, hidden));
        _v1 = AddParameter("v1", init.Normal(s.NumExperts * s.Intermediate, hidden));
        _w2 = AddParameter("w2", init.Normal(s.NumExperts * s.Intermediate, hidden));
        _act = AddChild("activation_fn", new Activation(s.Act));
    }

    void IParamDeltaOwner.AttachDelta(string parameterName, IParamDelta delta)
    {
        if (parameterName is not ("w1" or "v1" or "w2")) throw new NotSupportedException($"DbrxExpertGLU has no parameter '{parameterName}'.");
        if (delta is not ILowRankDelta) throw new NotSupportedException($"{delta.GetType().Name} on DbrxExpertGLU.{parameterName} has no low-rank form.");
        if (!_deltas.TryGetValue(parameterName, out var list)) _deltas[parameterName] = list = [];
        list.Add(delta);
    }

    /// <param name="x">[T, H]</param><param name="topIdx">[T, k]</param><param name="topW">[T, k]</param>
    public Tensor Forward(Tensor x, Tensor topIdx, Tensor topW)
    {
        var factors = new Dictionary<string, List<(Tensor L, Tensor R)>>(StringComparer.Ordinal);
        foreach (var (name, list) in _deltas)
            factors[name] = list.Where(d => d.Enabled).Select(d => ((ILowRankDelta)d).Factors()).Select(f => (f.L.to(x.dtype), f.R.to(x.dtype))).ToList();
        var counts = ExpertCounts.Read(topIdx, _experts);
        LastSelectedCounts = counts;
        var final = zeros_like(x);
        for (long e = 0; e < _experts; e++)
        {
            if (counts[e] == 0) continue;
            Tensor where;
            using (no_grad()) where = topIdx.eq(e).nonzero();      // (token, slot), token-major as torch.where
            var tok = where[.., 0];
            var cur = x.index_select(0, tok);
            var h = _act.Forward(Rows(cur, _w1, "w1", e, factors)) * Rows(cur, _v1, "v1", e, factors);
            var y = Down(h, e, factors) * topW.index(TensorIndex.Tensor(tok), TensorIndex.Tensor(where[.., 1])).unsqueeze(-1);
            final = final.index_add(0, tok, y.to(final.dtype), 1.0);
        }
        return final;
    }

    // x · Wₑᵀ (+ x · Rᵀ · Lₑᵀ per adapter) for the gate and up matrices.
    Tensor Rows(Tensor x, Tensor w, string name, long e, Dictionary<string, List<(Tensor L, Tensor R)>> factors)
    {
        var y = nn.functional.linear(x, w.narrow(0, e * _inter, _inter));
        if (factors.TryGetValue(name, out var list))
            foreach (var (l, r) in list) y = y + nn.functional.linear(nn.functional.linear(x, r), l.narrow(0, e * _inter, _inter));
        return y;
    }

    // h · w2ₑ (+ h · Lₑ · R per adapter): w2 is used as (in, out).
    Tensor Down(Tensor h, long e, Dictionary<string, List<(Tensor L, Tensor R)>> factors)
    {
        var y = matmul(h, _w2.narrow(0, e * _inter, _inter));
        if (factors.TryGetValue("w2", out var list))
            foreach (var (l, r) in list) y = y + matmul(matmul(h, l.narrow(0, e * _inter, _inter)), r);
        return y;
    }
}
