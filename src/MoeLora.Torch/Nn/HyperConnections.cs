using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// One hyper-connection (<see cref="HyperConnectionSettings"/>; transformers' <c>HYV4HyperConnection</c>, or
/// <c>DeepseekV4HyperConnection</c> when it mixes the streams): Parameters fn, base, scale and the parameter-free
/// <c>input_norm</c>. From the streams [B, S, n, H] it returns the post weights [B, S, n], the sublayer input Σ pre·x
/// [B, S, H] and, for DeepSeek-V4, the Sinkhorn-projected stream mix comb [B, S, n, n] (else null), computed in fp32.
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
        long mixes = s.MixesStreams ? (2 + n) * n : 2 * n;
        _fn = AddParameter("fn", init.Normal(mixes, n * hidden));
        // DeepseekV4PreTrainedModel._init_weights: base 0, scale 1; HY-V4's: see HyperInit.Base, scale 0.01.
        _base = AddParameter("base", s.MixesStreams ? init.Zeros(mixes) : HyperInit.Base(n, mixes, init));
        _scale = AddParameter("scale", s.MixesStreams ? init.Ones(3) : init.Ones(2) * 0.01);
        AddChild("input_norm", new Container());
    }

    public (Tensor Post, Tensor Input, Tensor? Comb) Forward(Tensor streams)
    {
        long n = _s.Streams;
        var mixes = HyperInit.Mixes(streams, _fn, _s.NormEps);
        long[] sizes = _s.MixesStreams ? [n, n, n * n] : [n, n];
        var b = _base.to(ScalarType.Float32).split(sizes, -1);
        var sc = _scale.to(ScalarType.Float32);
        var m = mixes.split(sizes, -1);
        var pre = nn.functional.sigmoid(m[0] * sc[0] + b[0]) + _s.Eps;
        var post = nn.functional.sigmoid(m[1] * sc[1] + b[1]) * _s.PostMagnitude;
        var input = HyperInit.Collapse(pre, streams);
        if (!_s.MixesStreams) return (post + _s.Eps, input, null);
        return (post, input, Sinkhorn(m[2].view([.. m[2].shape[..^1], n, n]) * sc[2] + b[2].view(n, n)));
    }

    // DeepseekV4HyperConnection.forward: softmax over the last axis + eps, one column normalisation, then
    // hc_sinkhorn_iters − 1 rounds of row and column normalisation (each sum + eps).
    Tensor Sinkhorn(Tensor logits)
    {
        double eps = _s.Eps;
        var comb = logits.softmax(-1) + eps;
        comb = comb / (comb.sum(-2, keepdim: true) + eps);
        for (long i = 0; i < _s.SinkhornIterations - 1; i++)
        {
            comb = comb / (comb.sum(-1, keepdim: true) + eps);
            comb = comb / (comb.sum(-2, keepdim: true) + eps);
        }
        return comb;
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
        _base = AddParameter("hc_base", s.MixesStreams ? init.Zeros(n) : HyperInit.Base(n, n, init));
        _scale = AddParameter("hc_scale", s.MixesStreams ? init.Ones(1) : init.Ones(1) * 0.01);
        AddChild("input_norm", new Container());
    }

    public Tensor Forward(Tensor streams)
    {
        var mixes = HyperInit.Mixes(streams, _fn, _s.NormEps);
        var pre = nn.functional.sigmoid(mixes * _scale.to(ScalarType.Float32) + _base.to(ScalarType.Float32)) + _s.Eps;
        return HyperInit.Collapse(pre, streams);
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

    /// <summary>Σ pre·x over the streams: pre [B, S, n] (fp32) weighs streams [B, S, n, H]; the sum comes back in their dtype.</summary>
    public static Tensor Collapse(Tensor pre, Tensor streams) => (pre.unsqueeze(-1) * streams).sum(2).to(streams.dtype);

    /// <summary>fp32 <c>linear(flat, fn) · rsqrt(mean(flat²) + eps)</c> of the flattened streams [B, S, n·H] (HYV4UnweightedRMSNorm).</summary>
    public static Tensor Mixes(Tensor streams, Tensor fn, double eps)
    {
        var flat = streams.flatten(2).to(ScalarType.Float32);
        var inv = rsqrt(flat.square().mean([-1], keepdim: true) + eps);
        return nn.functional.linear(flat, fn.to(ScalarType.Float32)) * inv;
    }
}

/// <summary>
/// A pre-norm decoder layer on hyper-connected streams (<c>HYV4DecoderLayer</c>, <c>DeepseekV4DecoderLayer</c>),
/// registered self_attn, the feed-forward, input_layernorm, post_attention_layernorm, then the two hyper-connections:
/// for each sublayer <c>(post, h) = hc(x)</c>, <c>x = post·sublayer(norm(h)) + x</c> (each stream gets the output times
/// its post weight, in fp32, cast back); DeepSeek-V4 replaces the residual by the streams mixed with comb,
/// <c>x = post·sublayer(norm(h)) + combᵀ·x</c>, in the streams' dtype.
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
        var (post, h, comb) = _attnHc.Forward(x);
        x = Mix(post, comb, _attn.Forward(_ln1.Forward(h), ctx), x);
        (post, h, comb) = _ffHc.Forward(x);
        return Mix(post, comb, _ff.Forward(_ln2.Forward(h), ctx), x);
    }

    // post [B, S, n] · out [B, S, H] per stream, plus the streams (in fp32, cast back) or, with comb [B, S, n, n],
    // plus combᵀ @ streams in the streams' dtype (DeepseekV4DecoderLayer casts post and comb to it first).
    static Tensor Mix(Tensor post, Tensor? comb, Tensor output, Tensor streams)
    {
        if (comb is not null)
        {
            var dt = streams.dtype;
            return post.to(dt).unsqueeze(-1) * output.to(dt).unsqueeze(-2) + matmul(comb.to(dt).transpose(-1, -2), streams);
        }
        return (post.to(ScalarType.Float32).unsqueeze(-1) * output.to(ScalarType.Float32).unsqueeze(-2) + streams.to(ScalarType.Float32)).to(streams.dtype);
    }
}
