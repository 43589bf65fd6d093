using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// Dynamic-mask attention (<see cref="DynamicMaskAttentionSettings"/>, Doge's <c>DogeAttention</c>): per-head RMSNorm
/// on q and k before rope; the additive mask of each kv head is <c>exp(A · softplus(dt_proj(v)))</c> per key, set to
/// the dtype's minimum wherever the causal mask forbids; with more keys than <c>keep_window_size</c> only each row's
/// top ones stay. The mask is repeated over the query group and added to the scaled scores (eager softmax in fp32).
/// </summary>
public sealed class DynamicMaskAttention : HfModule, IBlock
{
    public Parameter A { get; }
    public Linear q_proj { get; }
    public Linear k_proj { get; }
    public Linear v_proj { get; }
    public Linear dt_proj { get; }
    public Linear o_proj { get; }
    readonly RmsNorm _qNorm, _kNorm;
    readonly DynamicMaskAttentionSettings _s;
    readonly Rotary _rope;

    public DynamicMaskAttention(long hidden, DynamicMaskAttentionSettings s, Rotary rope, Init init)
    {
        _s = s; _rope = rope;
        // A is a direct Parameter: PyTorch enumerates it before the children whatever the assignment order.
        A = AddParameter("A", init.Zeros(s.KvHeads));
        q_proj = AddChild("q_proj", new Linear(hidden, s.Heads * s.HeadDim, s.Bias, init));
        k_proj = AddChild("k_proj", new Linear(hidden, s.KvHeads * s.HeadDim, s.Bias, init));
        v_proj = AddChild("v_proj", new Linear(hidden, s.KvHeads * s.HeadDim, s.Bias, init));
        dt_proj = AddChild("dt_proj", new Linear(s.KvHeads * s.HeadDim, s.KvHeads, s.Bias, init));
        o_proj = AddChild("o_proj", new Linear(s.Heads * s.HeadDim, hidden, s.Bias, init));
        _qNorm = AddChild("q_norm", new RmsNorm(s.HeadDim, s.QkNormEps, init));
        _kNorm = AddChild("k_norm", new RmsNorm(s.HeadDim, s.QkNormEps, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], n = x.shape[1], d = _s.HeadDim;
        var q = _qNorm.Forward(q_proj.Forward(x).view(b, n, -1, d)).transpose(1, 2);
        var k = _kNorm.Forward(k_proj.Forward(x).view(b, n, -1, d)).transpose(1, 2);
        var v = v_proj.Forward(x).view(b, n, -1, d).transpose(1, 2);
        var rotation = _rope.Half(ctx, ctx.DType);
        q = rotation.Apply(q);
        k = rotation.Apply(k);

        // dt_proj reads v after the head split and re-merge (the same [B, S, kv·d] as v_proj's output).
        var dt = dt_proj.Forward(v.transpose(1, 2).reshape(b, n, -1));
        dt = (A * nn.functional.softplus(dt)).exp().transpose(-1, -2);          // [B, kv, S]
        var causal = ctx.Mask(_s.Mask);                                          // [B, 1, S, S], 0 where allowed
        var min = MinOf(x.dtype);
        var mask = dt.unsqueeze(2).expand(-1, -1, n, -1).masked_fill(causal.ne(0), min);
        if (mask.shape[^1] > _s.KeepWindowSize)
        {
            var keep = mask.topk((int)_s.KeepWindowSize, -1, largest: true, sorted: false).indexes;
            var active = zeros_like(mask).scatter(-1, keep, ones_like(keep, mask.dtype));
            mask = mask.masked_fill(active.eq(0), min);
        }
        mask = AttentionMath.RepeatKv(mask, _s.Heads / _s.KvHeads);
        // Eager under either implementation: the dynamic mask is itself a [B, heads, S, S] tensor that needs grad,
        // so SDPA would not avoid keeping S × S values per head.
        var o = AttentionMath.Eager(q, k, v, mask, Math.Pow(d, -0.5));
        return o_proj.Forward(o);
    }

    static double MinOf(ScalarType t) => t switch
    {
        ScalarType.Float32 => float.MinValue,
        ScalarType.Float64 => double.MinValue,
        ScalarType.Float16 => -65504.0,
        _ => -3.3895313892515355e38,
    };
}
