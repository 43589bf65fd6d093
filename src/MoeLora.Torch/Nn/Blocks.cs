using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

public interface IBlock
{
    Tensor Forward(Tensor x, ForwardContext ctx);
}

/// <summary>Pre-norm decoder layer: h = x + attn(norm1(x)); out = h + ff(norm2(h)).</summary>
public sealed class DecoderLayer : HfModule
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

public enum QkNorm { None, PerHead, Full }

/// <summary>
/// Standard GQA self-attention (Llama, Qwen3, Mixtral, Qwen-MoE, OLMoE, gpt-oss): q/k/v/o projections,
/// optional q/k RMSNorm (per head: Qwen3; over the whole projection: OLMoE), rotary (half rotation),
/// causal/sliding mask and optional attention sinks (gpt-oss, a direct parameter registered first).
/// </summary>
public sealed class StandardAttention : HfModule, IBlock
{
    public Linear q_proj { get; }
    public Linear k_proj { get; }
    public Linear v_proj { get; }
    public Linear o_proj { get; }
    readonly RmsNorm? _qNorm, _kNorm;
    readonly Parameter? _sinks;
    readonly long _heads, _kvHeads, _headDim;
    readonly QkNorm _qkNorm;
    readonly MaskKind _maskKind;
    readonly long _window;
    readonly Func<ForwardContext, (Tensor, Tensor)> _rope;

    public sealed record Options(bool QkvBias, bool OBias, QkNorm QkNorm, bool Sinks, MaskKind Mask, long Window);

    public StandardAttention(Models.ModelConfig c, Options o, Init init, Func<ForwardContext, (Tensor Cos, Tensor Sin)> rope)
    {
        long h = c.HiddenSize;
        _heads = c.NumHeads; _kvHeads = c.NumKvHeads; _headDim = c.HeadDim;
        _qkNorm = o.QkNorm; _maskKind = o.Mask; _window = o.Window; _rope = rope;
        if (o.Sinks) _sinks = AddParameter("sinks", init.Normal(_heads));
        q_proj = AddChild("q_proj", new Linear(h, _heads * _headDim, o.QkvBias, init));
        k_proj = AddChild("k_proj", new Linear(h, _kvHeads * _headDim, o.QkvBias, init));
        v_proj = AddChild("v_proj", new Linear(h, _kvHeads * _headDim, o.QkvBias, init));
        o_proj = AddChild("o_proj", new Linear(_heads * _headDim, h, o.OBias, init));
        if (o.QkNorm == QkNorm.PerHead)
        {
            _qNorm = AddChild("q_norm", new RmsNorm(_headDim, c.RmsEps, init));
            _kNorm = AddChild("k_norm", new RmsNorm(_headDim, c.RmsEps, init));
        }
        else if (o.QkNorm == QkNorm.Full)
        {
            _qNorm = AddChild("q_norm", new RmsNorm(_heads * _headDim, c.RmsEps, init));
            _kNorm = AddChild("k_norm", new RmsNorm(_kvHeads * _headDim, c.RmsEps, init));
        }
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1];
        var q = q_proj.Forward(x);
        var k = k_proj.Forward(x);
        var v = v_proj.Forward(x);
        if (_qkNorm == QkNorm.Full) { q = _qNorm!.Forward(q); k = _kNorm!.Forward(k); }
        q = q.view(b, s, -1, _headDim);
        k = k.view(b, s, -1, _headDim);
        if (_qkNorm == QkNorm.PerHead) { q = _qNorm!.Forward(q); k = _kNorm!.Forward(k); }
        q = q.transpose(1, 2); k = k.transpose(1, 2);
        v = v.view(b, s, -1, _headDim).transpose(1, 2);
        var (cos, sin) = _rope(ctx);
        q = Rotary.ApplyHalf(q, cos, sin);
        k = Rotary.ApplyHalf(k, cos, sin);
        var o = AttentionMath.Eager(q, k, v, ctx.Mask(_maskKind, _window), Math.Pow(_headDim, -0.5), _sinks);
        return o_proj.Forward(o);
    }
}
