using MoeLora.Core.Architectures.Runtime;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

public interface IBlock
{
    Tensor Forward(Tensor x, ForwardContext ctx);
}

/// <summary>A decoder layer: residual stream in, residual stream out.</summary>
public interface IDecoderLayer
{
    Tensor Forward(Tensor x, ForwardContext ctx);
}

/// <summary>Pre-norm decoder layer: h = x + attn(norm1(x)); out = h + ff(norm2(h)).</summary>
public sealed class DecoderLayer : HfModule, IDecoderLayer
{
    readonly IBlock _attn, _ff;
    readonly RmsNorm _ln1, _ln2;

    /// <param name="ffName">"mlp" for most families, "feed_forward" for Llama4.</param>
    public DecoderLayer(HfModule attn, string ffName, HfModule ff, RmsNorm inputNorm, RmsNorm postNorm)
    {
        _attn = (IBlock)AddChild("self_attn", attn);
        _ff = (IBlock)AddChild(ffName, ff);
        _ln1 = AddChild("input_layernorm", inputNorm);
        _ln2 = AddChild("post_attention_layernorm", postNorm);
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var h = x + _attn.Forward(_ln1.Forward(x), ctx);
        return h + _ff.Forward(_ln2.Forward(h), ctx);
    }
}

/// <summary>
/// Standard GQA self-attention (<see cref="StandardAttentionSettings"/>: Llama, Qwen, Mixtral, OLMoE, GLM-4.5, gpt-oss):
/// q/k/v/o projections, optional q/k RMSNorm (per head or over the whole projection), rotary by rotating halves on
/// the first RotaryDim dims of each head, causal/sliding mask and optional attention sinks (a direct parameter
/// registered first).
/// </summary>
public sealed class StandardAttention : HfModule, IBlock
{
    public Linear q_proj { get; }
    public Linear k_proj { get; }
    public Linear v_proj { get; }
    public Linear o_proj { get; }
    readonly RmsNorm? _qNorm, _kNorm;
    readonly Linear? _gate;
    readonly Parameter? _sinks;
    readonly StandardAttentionSettings _s;
    readonly Rotary _rope;

    public StandardAttention(long hidden, StandardAttentionSettings s, Rotary rope, Init init)
    {
        _s = s; _rope = s.Options?.LayerRope is { } own ? Rotary.FromSettings(own) : rope;
        if (s.Sinks) _sinks = AddParameter("sinks", init.Normal(s.Heads));
        q_proj = AddChild("q_proj", new Linear(hidden, s.Heads * s.HeadDim, s.QkvBias, init));
        k_proj = AddChild("k_proj", new Linear(hidden, s.KvHeads * s.HeadDim, s.QkvBias, init));
        v_proj = AddChild("v_proj", new Linear(hidden, s.KvHeads * s.HeadDim, s.QkvBias, init));
        o_proj = AddChild("o_proj", new Linear(s.Heads * s.HeadDim, hidden, s.OBias, init));
        var qk = new NormSettings(s.Options?.QkNormKind ?? NormKind.Rms, s.QkNormEps);
        if (s.QkNorm == QkNormKind.PerHead)
        {
            _qNorm = AddChild("q_norm", new RmsNorm(s.HeadDim, qk, init));
            _kNorm = AddChild("k_norm", new RmsNorm(s.HeadDim, qk, init));
        }
        else if (s.QkNorm == QkNormKind.Full)
        {
            _qNorm = AddChild("q_norm", new RmsNorm(s.Heads * s.HeadDim, qk, init));
            _kNorm = AddChild("k_norm", new RmsNorm(s.KvHeads * s.HeadDim, qk, init));
        }
        if (s.Options?.Gate is { } g) _gate = AddChild(g.Name, new Linear(hidden, g.PerHead ? s.Heads : s.Heads * s.HeadDim, false, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1], d = _s.HeadDim;
        var q = q_proj.Forward(x);
        var k = k_proj.Forward(x);
        var v = v_proj.Forward(x);
        if (_s.QkNorm == QkNormKind.Full) { q = _qNorm!.Forward(q); k = _kNorm!.Forward(k); }
        q = q.view(b, s, -1, d);
        k = k.view(b, s, -1, d);
        if (_s.QkNorm == QkNormKind.PerHead) { q = _qNorm!.Forward(q); k = _kNorm!.Forward(k); }
        q = q.transpose(1, 2); k = k.transpose(1, 2);
        v = v.view(b, s, -1, d).transpose(1, 2);
        var opt = _s.Options;
        if (opt is { InterleavedRope: true, UseRope: true })
        {
            q = AttentionExtras.ApplyInterleavedPairs(q, _rope, ctx.Positions);
            k = AttentionExtras.ApplyInterleavedPairs(k, _rope, ctx.Positions);
        }
        else if (opt?.UseRope ?? true)
        {
            var (cos, sin) = _rope.CosSin(ctx.Positions, ctx.DType);
            q = Rotate(q, cos, sin);
            k = Rotate(k, cos, sin);
        }
        var o = AttentionMath.Eager(q, k, v, ctx.Mask(_s.Mask), opt?.Scaling ?? Math.Pow(d, -0.5), _sinks);
        if (_gate is not null) o = AttentionExtras.Gate(o, _gate, opt!.Gate!, x, d);
        return o_proj.Forward(o);
    }

    // Partial rotary (GLM-4.5): rotate the first RotaryDim dims, pass the rest through.
    Tensor Rotate(Tensor x, Tensor cos, Tensor sin)
    {
        if (_s.RotaryDim == _s.HeadDim) return Rotary.ApplyHalf(x, cos, sin);
        var parts = x.split([_s.RotaryDim, _s.HeadDim - _s.RotaryDim], -1);
        return cat([Rotary.ApplyHalf(parts[0], cos, sin), parts[1]], -1);
    }
}
