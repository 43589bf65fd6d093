using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// ZAYA's compressed convolutional attention (<see cref="CcaAttentionSettings"/>): transformers' <c>ZayaAttention</c>
/// with <c>ZayaCCAProjection.forward</c> (no cache) and <c>ZayaQKNorm</c>, registered o_proj, qkv_proj (q_proj, k_proj,
/// v_proj_current, v_proj_delayed, conv_qk_depthwise, conv_qk_grouped), qk_norm.
/// </summary>
public sealed class CcaAttention : HfModule, IBlock
{
    readonly Linear _o, _q, _k, _vCurrent, _vDelayed;
    readonly DepthwiseConv1d _depthwise, _grouped;
    readonly QkTemperature _qkNorm;
    readonly CcaAttentionSettings _s;
    readonly Rotary _rope;
    readonly long _hidden;

    public CcaAttention(long hidden, CcaAttentionSettings s, Rotary rope, Init init)
    {
        _s = s; _rope = rope; _hidden = hidden;
        long q = s.Heads * s.HeadDim, kv = s.KvHeads * s.HeadDim, channels = q + kv;
        _o = AddChild("o_proj", new Linear(q, hidden, s.Bias, init));
        var qkv = AddChild("qkv_proj", new Container());
        _q = qkv.Add("q_proj", new Linear(hidden, q, s.Bias, init));
        _k = qkv.Add("k_proj", new Linear(hidden, kv, s.Bias, init));
        _vCurrent = qkv.Add("v_proj_current", new Linear(hidden, kv / 2, s.Bias, init));
        _vDelayed = qkv.Add("v_proj_delayed", new Linear(hidden, kv / 2, s.Bias, init));
        _depthwise = qkv.Add("conv_qk_depthwise", new DepthwiseConv1d(channels, s.DepthwiseKernel, init, hasBias: true));
        _grouped = qkv.Add("conv_qk_grouped", new DepthwiseConv1d(channels, s.GroupedKernel, init, hasBias: true, groups: s.Heads + s.KvHeads));
        _qkNorm = AddChild("qk_norm", new QkTemperature(s.KvHeads, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1], heads = _s.Heads, kvHeads = _s.KvHeads, d = _s.HeadDim, groups = heads / kvHeads;
        // The "conv" mask: padded positions are zeroed before any projection (a no-op without padding).
        x = ShortConv.MaskPadding(x, ctx.AttentionMask);
        var q = _q.Forward(x);
        var k = _k.Forward(x);
        // Residual paths: per head (q + its kv head's k) / 2 for the query, that averaged over each kv group for the key.
        var kPerHead = k.view(b, s, kvHeads, 1, d).expand(b, s, kvHeads, groups, d).reshape(b, s, heads, d);
        var queryResidual = (q.view(b, s, heads, d) + kPerHead) * 0.5;
        var keyResidual = queryResidual.view(b, s, kvHeads, groups, d).mean([-2]);
        // Both convolutions unpadded after one left padding of (K₀ − 1) + (K₁ − 1) zeros, as ZayaCCAProjection pads.
        var qk = cat([q, k], -1).transpose(1, 2);
        qk = nn.functional.pad(qk, [(_s.DepthwiseKernel - 1) + (_s.GroupedKernel - 1), 0]);
        qk = _grouped.Valid(_depthwise.Valid(qk)).transpose(1, 2);
        var query = qk.narrow(-1, 0, heads * d).reshape(b, s, heads, d) + queryResidual;
        var key = qk.narrow(-1, heads * d, kvHeads * d).reshape(b, s, kvHeads, d) + keyResidual;
        // Values: this token's half, then the previous token's (the first token's previous state is v_proj_delayed(0)).
        var delayed = _vDelayed.Forward(x);
        var first = _vDelayed.Forward(zeros(b, 1, _hidden, x.dtype, x.device));
        var value = cat([_vCurrent.Forward(x), cat([first, delayed.narrow(1, 0, s - 1)], 1)], -1).view(b, s, kvHeads, d);
        (query, key) = _qkNorm.Forward(query, key, d);
        query = query.transpose(1, 2); key = key.transpose(1, 2); value = value.transpose(1, 2);
        var rotation = _rope.Half(ctx, ctx.DType);
        query = rotation.Apply(query);
        key = rotation.Apply(key);
        var o = AttentionMath.Attend(query, key, value, ctx, _s.Mask, Math.Pow(d, -0.5));
        return _o.Forward(o);
    }
}

/// <summary>
/// ZayaQKNorm: q and k [B, S, heads, D] L2-normalised to √D (the norm clamped at the dtype's eps), k then times the
/// per-kv-head Parameter <c>temp</c> (zeros at init, as transformers initialises it).
/// </summary>
public sealed class QkTemperature : HfModule
{
    public Parameter temp { get; }

    public QkTemperature(long kvHeads, Init init) => temp = AddParameter("temp", init.Zeros(kvHeads));

    public (Tensor Q, Tensor K) Forward(Tensor q, Tensor k, long headDim)
    {
        double eps = q.dtype switch
        {
            ScalarType.Float64 => 2.220446049250313e-16,
            ScalarType.BFloat16 => 0.0078125,
            ScalarType.Float16 => 0.0009765625,
            _ => 1.1920928955078125e-07,
        };
        double scale = Math.Sqrt(headDim);
        q = q * (scale / q.norm(-1, true, 2).clamp_min(eps));
        k = k * (scale / k.norm(-1, true, 2).clamp_min(eps));
        return (q, k * temp.to(k.dtype).view(1, 1, -1, 1));
    }
}
