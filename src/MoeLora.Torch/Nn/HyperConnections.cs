using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// One hyper-connection (<see cref="HyperConnectionSettings"/>; transformers' <c>HYV4HyperConnection</c>): Parameters fn,
/// base, scale and the parameter-free <c>input_norm</c>. From the streams [B, S, n, H] it returns the post weights
/// [B, S, n] and the sublayer input Σ pre·x [B, S, H], all computed in fp32.
/// </summary>
public sealed class HyperConnection : HfModule
{
    readonly Parameter _fn, _base, _scale;
    readonly HyperConnectionSettings _s;

    public HyperConnection(long hidden, HyperConnectionSettings s, Init init)
    {
        _s = s;
        long n = s.Streams;
        init = HyperInit.Fp32(init);
        _fn = AddParameter("fn", init.Normal(2 * n, n * hidden));
        _base = AddParameter("base", HyperInit.Base(n, 2 * n, init));
        _scale = AddParameter("scale", init.Ones(2) * 0.01);
        AddChild("input_norm", new Container());
    }

    public (Tensor Post, Tensor Input) Forward(Tensor streams)
    {
        long n = _s.Streams;
        var mixes = HyperInit.Mixes(streams, _fn, _s.NormEps);
        var b = _base.to(ScalarType.Float32).split([n, n], -1);
        var sc = _scale.to(ScalarType.Float32);
        var m = mixes.split([n, n], -1);
        var pre = nn.functional.sigmoid(m[0] * sc[0] + b[0]) + _s.Eps;
        var post = nn.functional.sigmoid(m[1] * sc[1] + b[1]) * _s.PostMagnitude + _s.Eps;
        var input = (pre.unsqueeze(-1) * streams).sum(2);
        return (post, input.to(streams.dtype));
    }
}

/// <summary>
/// The final collapse of the streams (transformers' <c>HYV4HyperHead</c>): hc_fn, hc_base, hc_scale and the
/// parameter-free <c>input_norm</c>; Σ pre·x over the streams in fp32, pre = sigmoid(mix·scale + base) + eps.
/// </summary>
public sealed class HyperHead : HfModule
{
    readonly Parameter _fn, _base, _scale;
    readonly HyperConnectionSettings _s;

    public HyperHead(long hidden, HyperConnectionSettings s, Init init)
    {
        _s = s;
        long n = s.Streams;
        init = HyperInit.Fp32(init);
        _fn = AddParameter("hc_fn", init.Normal(n, n * hidden));
        _base = AddParameter("hc_base", HyperInit.Base(n, n, init));
        _scale = AddParameter("hc_scale", init.Ones(1) * 0.01);
        AddChild("input_norm", new Container());
    }

    public Tensor Forward(Tensor streams)
    {
        var mixes = HyperInit.Mixes(streams, _fn, _s.NormEps);
        var pre = nn.functional.sigmoid(mixes * _scale.to(ScalarType.Float32) + _base.to(ScalarType.Float32)) + _s.Eps;
        return (pre.unsqueeze(-1) * streams).sum(2).to(streams.dtype);
    }
}

internal static class HyperInit
{
    /// <summary>transformers keeps fn, base, scale and the hc_ ones in fp32 whatever the model's dtype (_keep_in_fp32_modules_strict).</summary>
    public static Init Fp32(Init init) => init with { DType = ScalarType.Float32 };

    /// <summary>
    /// transformers' init of base / hc_base: the first <paramref name="streams"/> entries (the pre weights)
    /// −log(max(n − 1, 1)), the others 0.
    /// </summary>
    public static Tensor Base(long streams, long size, Init init)
    {
        var t = init.Zeros(size);
        using (no_grad()) t[TensorIndex.Slice(0, streams)].fill_(-Math.Log(Math.Max(streams - 1, 1)));
        return t;
    }

    /// <summary>fp32 <c>linear(flat, fn) · rsqrt(mean(flat²) + eps)</c> of the flattened streams [B, S, n·H] (HYV4UnweightedRMSNorm).</summary>
    public static Tensor Mixes(Tensor streams, Tensor fn, double eps)
    {
        var flat = streams.flatten(2).to(ScalarType.Float32);
        var inv = rsqrt(flat.square().mean([-1], keepdim: true) + eps);
        return nn.functional.linear(flat, fn.to(ScalarType.Float32)) * inv;
    }
}

/// <summary>
/// A pre-norm decoder layer on hyper-connected streams (<c>HYV4DecoderLayer</c>), registered self_attn, the
/// feed-forward, input_layernorm, post_attention_layernorm, then the two hyper-connections: for each sublayer
/// <c>(post, h) = hc(x)</c>, <c>x = post·sublayer(norm(h)) + x</c> (each stream gets the output times its post weight,
/// in fp32, cast back).
/// </summary>
public sealed class HyperConnectionDecoderLayer : HfModule, IDecoderLayer
{
    readonly IBlock _attn, _ff;
    readonly RmsNorm _ln1, _ln2;
    readonly HyperConnection _attnHc, _ffHc;

    public HyperConnectionDecoderLayer(HfModule attn, string ffName, HfModule ff, RmsNorm inputNorm, RmsNorm postNorm,
        HyperConnectionSettings s, long hidden, Init init)
    {
        _attn = (IBlock)AddChild("self_attn", attn);
        _ff = (IBlock)AddChild(ffName, ff);
        _ln1 = AddChild("input_layernorm", inputNorm);
        _ln2 = AddChild("post_attention_layernorm", postNorm);
        _attnHc = AddChild(s.AttentionName, new HyperConnection(hidden, s, init));
        _ffHc = AddChild(s.FeedForwardName, new HyperConnection(hidden, s, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var (post, h) = _attnHc.Forward(x);
        x = Mix(post, _attn.Forward(_ln1.Forward(h), ctx), x);
        (post, h) = _ffHc.Forward(x);
        return Mix(post, _ff.Forward(_ln2.Forward(h), ctx), x);
    }

    // post [B, S, n] · out [B, S, H] per stream, plus the streams, in fp32, cast back.
    static Tensor Mix(Tensor post, Tensor output, Tensor streams) =>
        (post.to(ScalarType.Float32).unsqueeze(-1) * output.to(ScalarType.Float32).unsqueeze(-2) + streams.to(ScalarType.Float32)).to(streams.dtype);
}
