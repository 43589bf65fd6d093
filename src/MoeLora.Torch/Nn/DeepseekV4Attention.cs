using MoeLora.Core;
using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// DeepSeek-V4's attention (<see cref="DeepseekV4AttentionSettings"/>; transformers' <c>DeepseekV4Attention.forward</c>,
/// eager path): q LoRA with an unweighted per-head norm, one shared key/value head, interleaved-pair rope on the last
/// rope dims, the sliding-window keys followed by the compressor's entries (<see cref="DeepseekV4Compressor"/>), eager
/// softmax with sinks, the inverse rope on the output, then the grouped output projection.
/// </summary>
public sealed class DeepseekV4Attention : HfModule, IBlock
{
    readonly Parameter _sinks;
    readonly Linear _qa, _qb, _kv, _ob;
    readonly RmsNorm _qaNorm, _kvNorm;
    readonly DeepseekV4GroupedLinear _oa;
    readonly DeepseekV4Compressor? _compressor;
    readonly DeepseekV4AttentionSettings _s;
    readonly Rotary _rope;

    public DeepseekV4Attention(long hidden, DeepseekV4AttentionSettings s, Rotary rope, Init init)
    {
        _s = s; _rope = rope;
        // _keep_in_fp32_modules_strict keeps sinks in fp32; _init_weights zeroes them.
        _sinks = AddParameter("sinks", zeros(s.Heads, ScalarType.Float32, init.Device));
        _qa = AddChild("q_a_proj", new Linear(hidden, s.QLoraRank, false, init));
        _qaNorm = AddChild("q_a_norm", new RmsNorm(s.QLoraRank, s.NormEps, init));
        _qb = AddChild("q_b_proj", new Linear(s.QLoraRank, s.Heads * s.HeadDim, false, init));
        AddChild("q_b_norm", new Container());
        _kv = AddChild("kv_proj", new Linear(hidden, s.HeadDim, false, init));
        _kvNorm = AddChild("kv_norm", new RmsNorm(s.HeadDim, s.NormEps, init));
        _oa = AddChild("o_a_proj", new DeepseekV4GroupedLinear(s.Heads * s.HeadDim / s.OGroups, s.OGroups * s.OLoraRank, s.OGroups, init));
        _ob = AddChild("o_b_proj", new Linear(s.OGroups * s.OLoraRank, hidden, false, init));
        if (s.Compressor is { } c) _compressor = AddChild("compressor", new DeepseekV4Compressor(hidden, s, c, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], n = x.shape[1], d = _s.HeadDim;
        var (cos, sin) = _rope.CosSin(ctx.Positions, ctx.DType, duplicate: false);
        var qResidual = _qaNorm.Forward(_qa.Forward(x));
        var q = RmsNorm.Normalize(_qb.Forward(qResidual).view(b, n, -1, d).transpose(1, 2), _s.NormEps);
        q = DeepseekV4Rope.Apply(q, cos, sin);
        var kv = DeepseekV4Rope.Apply(_kvNorm.Forward(_kv.Forward(x)).view(b, n, 1, d).transpose(1, 2), cos, sin);
        var mask = ctx.Mask(MaskKind.Sliding, _s.SlidingWindow);
        if (_compressor is not null)
        {
            // The compressed entries follow the window's keys, under the compressor's own bias (causality, indexer picks).
            var (entries, bias) = _compressor.Forward(x, qResidual, ctx);
            if (entries.shape[2] > 0)
            {
                kv = cat([kv, entries], 2);
                mask = cat([mask, (bias ?? zeros(b, 1, n, entries.shape[2], mask.dtype, mask.device)).to(mask.dtype)], -1);
            }
        }
        var o = AttentionMath.Eager(q, kv, kv, mask, Math.Pow(d, -0.5), _sinks).view(b, n, -1, d).transpose(1, 2);
        // K = V carried the keys' rotation into the output: rotate back by the query's position (−sin).
        o = DeepseekV4Rope.Apply(o, cos, -sin).transpose(1, 2);
        return _ob.Forward(_oa.Forward(o.reshape(b, n, _s.OGroups, -1)).flatten(2));
    }
}

/// <summary>
/// <c>DeepseekV4GroupedLinear</c> (<c>o_a_proj</c>): an nn.Linear whose weight [groups·rank, in] is used block-diagonally,
/// group g's input [.., in] times rows [g·rank, (g+1)·rank); x [.., groups, in] → [.., groups, rank].
/// PEFT's LoRA on it adds a [.., groups, groups·rank] update to that output and fails, so LoRA may not target it
/// (PeftModelTables.LoraForwardFails: the injector refuses it, the report warns).
/// </summary>
public sealed class DeepseekV4GroupedLinear : HfModule
{
    public Parameter weight { get; }
    readonly long _groups;

    public DeepseekV4GroupedLinear(long inPerGroup, long outFeatures, long groups, Init init)
    {
        _groups = groups;
        weight = AddParameter("weight", init.Normal(outFeatures, inPerGroup));
    }

    public Tensor Forward(Tensor x)
    {
        var shape = x.shape;
        long inF = shape[^1];
        var w = weight.view(_groups, -1, inF).transpose(1, 2);                       // [g, in, rank]
        var y = bmm(x.reshape(-1, _groups, inF).transpose(0, 1), w).transpose(0, 1);  // [N, g, rank]
        return y.reshape([.. shape[..^1], -1]);
    }
}

/// <summary>
/// A DeepSeek-V4 KV compressor (<see cref="KvCompressorSettings"/>): <c>DeepseekV4HCACompressor</c>, or
/// <c>DeepseekV4CSACompressor</c> with its <see cref="DeepseekV4Indexer"/>, in stateless single-shot mode (no cache:
/// the tokens after the last full window are dropped). Registered position_bias (fp32), kv_proj, gate_proj, kv_norm,
/// rotary_emb, then the indexer.
/// </summary>
public sealed class DeepseekV4Compressor : DeepseekV4Pooling
{
    readonly DeepseekV4Indexer? _indexer;

    public DeepseekV4Compressor(long hidden, DeepseekV4AttentionSettings s, KvCompressorSettings c, Init init)
        : base(hidden, s.HeadDim, c.Rate, c.Overlapping, s.NormEps, s.Rope, init)
    {
        AddChild("rotary_emb", new Container());
        if (c.Indexer is { } ix) _indexer = AddChild("indexer", new DeepseekV4Indexer(hidden, s, c.Rate, ix, init));
    }

    /// <summary>
    /// The compressed entries [B, 1, T, head_dim] and their additive bias [B, 1, S, T] for the queries (0 where a query
    /// reads the entry, −inf elsewhere; null when nothing was compressed).
    /// </summary>
    public (Tensor Entries, Tensor? Bias) Forward(Tensor x, Tensor qResidual, ForwardContext ctx)
    {
        long b = x.shape[0], n = x.shape[1];
        var entries = Pool(x).unsqueeze(1);
        long t = entries.shape[2];
        if (t == 0) return (entries, null);
        if (_indexer is null)
        {
            // DeepseekV4HCACompressor: query t reads entry w when w < (t + 1) // rate (a single query gets no bias).
            if (n == 1) return (entries, null);
            return (entries, where(Readable(ctx.Positions, t), 0.0, double.NegativeInfinity).to(entries.dtype).unsqueeze(1));
        }
        // DeepseekV4CSACompressor: only the indexer's valid picks; −1 marks a pick the query may not read.
        var picks = _indexer.TopK(x, qResidual, ctx);
        var safe = where(picks.ge(0), picks, full_like(picks, t));
        var bias = full(new[] { b, 1, n, t + 1 }, double.NegativeInfinity, entries.dtype, entries.device)
            .scatter(-1, safe.unsqueeze(1), zeros(new[] { b, 1, n, picks.shape[^1] }, entries.dtype, entries.device));
        return (entries, bias[.., .., .., ..(int)t]);
    }
}

/// <summary>
/// The pooling both compressors and the indexer own (registered position_bias, kv_proj, gate_proj, kv_norm): windows of
/// <c>rate</c> tokens, softmax over each window of gate + position_bias in fp32, the weighted kv summed, kv_norm, then
/// rope at position <c>w · rate</c>. Overlapping (CSA and its indexer): the projections are 2·dim wide, entry w pools
/// window w−1's first half with window w's second half over 2·rate slots (window 0's missing half gets weight 0).
/// </summary>
public abstract class DeepseekV4Pooling : HfModule
{
    readonly Parameter _positionBias;
    readonly Linear _kv, _gate;
    readonly RmsNorm _norm;
    readonly long _dim, _rate;
    readonly bool _overlap;
    readonly Rotary _rope;

    protected DeepseekV4Pooling(long hidden, long dim, long rate, bool overlap, double eps, RopeSettings rope, Init init)
    {
        _dim = dim; _rate = rate; _overlap = overlap;
        _rope = Rotary.FromSettings(rope);
        long width = overlap ? 2 * dim : dim;
        // position_bias is kept in fp32 (_keep_in_fp32_modules_strict) and initialised to zero.
        _positionBias = AddParameter("position_bias", zeros(rate, width, ScalarType.Float32, init.Device));
        _kv = AddChild("kv_proj", new Linear(hidden, width, false, init));
        _gate = AddChild("gate_proj", new Linear(hidden, width, false, init));
        _norm = AddChild("kv_norm", new RmsNorm(dim, eps, init));
    }

    /// <summary>[B, S, T]: entry w is readable by the query at position p when w &lt; (p + 1) // rate.</summary>
    protected Tensor Readable(Tensor positions, long entries) =>
        arange(entries, ScalarType.Int64, positions.device).view(1, 1, -1).lt(positions.add(1).div(_rate, RoundingMode.floor).unsqueeze(-1));

    /// <summary>The entries [B, T, dim], T = S // rate (normed, roped).</summary>
    protected Tensor Pool(Tensor x)
    {
        long b = x.shape[0], windows = x.shape[1] / _rate, usable = windows * _rate, r = _rate, d = _dim;
        var kv = _kv.Forward(x);
        if (windows == 0) return zeros(new[] { b, 0L, d }, kv.dtype, kv.device);
        var gate = _gate.Forward(x);
        var ck = kv[.., ..(int)usable].view(b, windows, r, -1);
        var cg = gate[.., ..(int)usable].view(b, windows, r, -1) + _positionBias;
        if (_overlap)
        {
            // Slots [0, r): the previous window's first series (−inf gates before window 0), [r, 2r): this window's second.
            var prevKv = cat([zeros(new[] { b, 1, r, d }, ck.dtype, ck.device), ck[.., ..^1, .., ..(int)d]], 1);
            var prevGate = cat([full(new[] { b, 1, r, d }, double.NegativeInfinity, cg.dtype, cg.device), cg[.., ..^1, .., ..(int)d]], 1);
            ck = cat([prevKv, ck[.., .., .., (int)d..]], 2);
            cg = cat([prevGate, cg[.., .., .., (int)d..]], 2);
        }
        var pooled = _norm.Forward((ck * cg.softmax(2, ScalarType.Float32).to(ck.dtype)).sum(2));
        var positions = (arange(windows, ScalarType.Int64, x.device) * r).unsqueeze(0).expand(b, windows);
        var (cos, sin) = _rope.CosSin(positions, pooled.dtype, duplicate: false);
        return DeepseekV4Rope.Apply(pooled.unsqueeze(1), cos, sin).squeeze(1);
    }
}

/// <summary>
/// DeepSeek-V4's lightning indexer (<see cref="LightningIndexerSettings"/>; <c>DeepseekV4Indexer</c> with its
/// <c>DeepseekV4IndexerScorer</c>), registered position_bias, kv_proj, gate_proj, kv_norm, q_b_proj, rotary_emb,
/// scorer (weights_proj). Its output is integer indices, so nothing is differentiated through it.
/// </summary>
public sealed class DeepseekV4Indexer : DeepseekV4Pooling
{
    readonly Linear _qb, _weights;
    readonly LightningIndexerSettings _s;
    readonly Rotary _rope;

    public DeepseekV4Indexer(long hidden, DeepseekV4AttentionSettings a, long rate, LightningIndexerSettings s, Init init)
        : base(hidden, s.HeadDim, rate, overlap: true, a.NormEps, a.Rope, init)
    {
        _s = s;
        _rope = Rotary.FromSettings(a.Rope);
        _qb = AddChild("q_b_proj", new Linear(a.QLoraRank, s.Heads * s.HeadDim, false, init));
        AddChild("rotary_emb", new Container());
        _weights = AddChild("scorer", new Container()).Add("weights_proj", new Linear(hidden, s.Heads, false, init));
    }

    /// <summary>Per query the picked entries [B, S, min(index_topk, T)], −1 for a pick the query may not read.</summary>
    public Tensor TopK(Tensor x, Tensor qResidual, ForwardContext ctx)
    {
        using var _ = no_grad();
        long b = x.shape[0], n = x.shape[1], h = _s.Heads, d = _s.HeadDim;
        var keys = Pool(x);                                                                     // [B, T, d]
        long t = keys.shape[1];
        var (cos, sin) = _rope.CosSin(ctx.Positions, ctx.DType, duplicate: false);
        var q = DeepseekV4Rope.Apply(_qb.Forward(qResidual).view(b, n, h, d).transpose(1, 2), cos, sin).transpose(1, 2); // [B, S, h, d]
        // DeepseekV4IndexerScorer: relu(q·k)·d^-0.5 summed over heads with weights_proj(x)·h^-0.5, in fp32.
        var scores = nn.functional.relu(matmul(q.to(ScalarType.Float32), keys.transpose(-1, -2).to(ScalarType.Float32).unsqueeze(1))) * Math.Pow(d, -0.5);
        var weights = _weights.Forward(x).to(ScalarType.Float32) * Math.Pow(h, -0.5);
        var index = (scores * weights.unsqueeze(-1)).sum(2);                                    // [B, S, T]
        var readable = Readable(ctx.Positions, t);
        var picks = index.masked_fill(readable.logical_not(), double.NegativeInfinity).topk((int)Math.Min(_s.TopK, t), -1).indexes;
        // Picks past what a query may read (too few readable entries) become −1.
        return where(readable.gather(-1, picks), picks, full_like(picks, -1));
    }
}

/// <summary>DeepSeek-V4's rope (its <c>apply_rotary_pos_emb</c>): interleaved pairs on the trailing rope dims.</summary>
internal static class DeepseekV4Rope
{
    /// <summary>
    /// x [B, heads, S, D]; cos / sin [B, S, r/2] (one angle per pair): the last r dims of each head rotated pair by pair,
    /// <c>x·cos + rot(x)·sin</c> in fp32 with rot(x)[2i] = −x[2i+1], rot(x)[2i+1] = x[2i], cast back; the rest passed through.
    /// </summary>
    public static Tensor Apply(Tensor x, Tensor cos, Tensor sin)
    {
        var c = cos.repeat_interleave(2, -1).unsqueeze(1);
        var s = sin.repeat_interleave(2, -1).unsqueeze(1);
        long r = c.shape[^1];
        var nope = x[.., .., .., ..^(int)r];
        var rope = x[.., .., .., ^(int)r..];
        var even = rope[.., .., .., TensorIndex.Slice(0, null, 2)];
        var odd = rope[.., .., .., TensorIndex.Slice(1, null, 2)];
        var rot = stack([-odd, even], -1).flatten(-2);
        var rotated = (rope.to(ScalarType.Float32) * c + rot.to(ScalarType.Float32) * s).to(x.dtype);
        return cat([nope, rotated], -1);
    }
}
