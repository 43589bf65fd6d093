using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// DeepSeek's multi-head latent attention (<see cref="MlaAttentionSettings"/>): low-rank q via q_a/q_b with
/// q_a_layernorm (or one q_proj), compressed kv via kv_a_proj_with_mqa and kv_b_proj, decoupled rope on the last
/// qk_rope_head_dim dims (optionally de-interleaved first, or as complex pairs for DeepSeek-V2, or none: Kimi Linear), an optional
/// position-dependent query scale (Mistral 4) or constant query / kv-latent scales (LongCat-Flash), attention (SDPA or eager)
/// with the settings' scaling; A.X-K2's gated query (q_gate_proj) and the DSA indexer's top-k key selection
/// (DeepSeek-V3.2, GLM-5, A.X-K2, HY-V4), own or reused; HY-V4's sinks and per-element output gate.
/// </summary>
public sealed class MlaAttention : HfModule, IBlock
{
    readonly Linear? _q, _qa, _qb;
    readonly DsaIndexer? _indexer;
    readonly RmsNorm? _qaNorm;
    readonly Linear _kva, _kvb, _o;
    readonly RmsNorm _kvaNorm;
    readonly long _heads, _nope, _ropeDim, _v, _kvRank;
    readonly bool _interleave, _complexPairs, _queryGate, _reusesTopK, _noRope;
    readonly double _scaling;
    readonly Llama4QueryScale? _queryScale;
    readonly MlaLatentScale? _latentScale;
    readonly Rotary _rope;
    readonly Parameter? _sinks;
    readonly Linear? _gate;

    public MlaAttention(long hidden, MlaAttentionSettings s, Rotary rope, Init init)
    {
        _rope = rope;
        // HYV4Attention's sinks: a direct Parameter, so named_parameters lists it before the children (init: learnable_sink_init 0),
        // kept in fp32 whatever the model's dtype (_keep_in_fp32_modules_strict).
        if (s.Sinks) _sinks = AddParameter("sinks", zeros(s.Heads, ScalarType.Float32, init.Device));
        _heads = s.Heads; _nope = s.QkNopeHeadDim; _ropeDim = s.QkRopeHeadDim; _v = s.VHeadDim; _kvRank = s.KvLoraRank;
        long qk = _nope + _ropeDim;
        if (s.QLoraRank is not long qRank) _q = AddChild("q_proj", new Linear(hidden, _heads * qk, false, init));
        else
        {
            _qa = AddChild("q_a_proj", new Linear(hidden, qRank, s.Bias, init));
            _qaNorm = AddChild("q_a_layernorm", new RmsNorm(qRank, s.LowRankNormEps, init));
            // A.X-K2: one projection of cat(normed latent, raw latent) to each head's query then its output gate.
            _qb = s.QueryGate ? AddChild("q_gate_proj", new Linear(2 * qRank, _heads * (qk + _v), false, init))
                : AddChild("q_b_proj", new Linear(qRank, _heads * qk, false, init));
        }
        if ((s.QueryGate || s.Indexer is not null) && s.QLoraRank is null)
            throw new InvalidDataException("a gated query or a DSA indexer needs q_lora_rank.");
        _kva = AddChild("kv_a_proj_with_mqa", new Linear(hidden, _kvRank + _ropeDim, s.Bias, init));
        _kvaNorm = AddChild("kv_a_layernorm", new RmsNorm(_kvRank, s.LowRankNormEps, init));
        _kvb = AddChild("kv_b_proj", new Linear(_kvRank, _heads * (_nope + _v), false, init));
        _o = AddChild("o_proj", new Linear(_heads * _v, hidden, s.Bias, init));
        if (s.Indexer is { } ix) _indexer = AddChild("indexer", new DsaIndexer(hidden, s.QLoraRank!.Value, _ropeDim, ix, init));
        if (s.Gate is { } g)
        {
            if (g.Kind != OutputGateKind.Sigmoid || g.PerHead) throw new NotSupportedException("MLA takes only a per-element sigmoid output gate.");
            _gate = AddChild(g.Name, new Linear(hidden, _heads * _v, false, init));
        }
        _queryGate = s.QueryGate;
        _reusesTopK = s.ReusesTopK;
        _interleave = s.RopeInterleave;
        _complexPairs = s.RopeComplexPairs;
        _noRope = s.NoRope;
        _scaling = s.Scaling;
        _queryScale = s.QueryScale;
        _latentScale = s.LatentScale;
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1];
        Tensor q, qResid = empty(0);
        Tensor? gate = null;
        if (_q is not null) q = _q.Forward(x);
        else
        {
            var qa = _qa!.Forward(x);
            qResid = _qaNorm!.Forward(qa);
            q = _qb!.Forward(_queryGate ? cat([qResid, qa], -1) : qResid);
        }
        if (_queryGate)
        {
            // AXK2Attention: per head qk_head_dim query dims, then v_head_dim gate dims.
            var qg = q.view(b, s, -1, _nope + _ropeDim + _v).split([_nope + _ropeDim, _v], -1);
            q = qg[0];
            gate = qg[1].reshape(b, s, -1);
        }
        // LongcatFlashMLA scales q_pass and q_rot alike (rope is linear, so before it is the same) and the normed latent
        // before kv_b_proj, so keys' nope part and values, not the shared rope key.
        if (_latentScale is { } ls) q = q * ls.Query;
        q = q.view(b, s, -1, _nope + _ropeDim).transpose(1, 2);
        var qParts = q.split([_nope, _ropeDim], -1);
        var ckv = _kva.Forward(x);
        var kvParts = ckv.split([_kvRank, _ropeDim], -1);
        var latent = _kvaNorm.Forward(kvParts[0]);
        if (_latentScale is { } lk) latent = latent * lk.KeyValue;
        var kv = _kvb.Forward(latent).view(b, s, -1, _nope + _v).transpose(1, 2);
        var kvSplit = kv.split([_nope, _v], -1);
        var kRot = kvParts[1].view(b, 1, s, _ropeDim);
        var (qRot, kRotE) = _noRope ? (qParts[1], kRot) : Rotate(qParts[1], kRot, ctx);
        kRotE = kRotE.expand(b, _heads, s, _ropeDim);
        var query = cat([qParts[0], qRot], -1);
        if (_queryScale is { } qs)
        {
            // get_llama_4_attn_scale: one factor per position, broadcast over heads and dims, in the query's dtype.
            var factor = 1 + qs.Beta * log(1 + floor(ctx.Positions.to(ScalarType.Float32) / qs.OriginalMaxPositionEmbeddings));
            query = query * factor.unsqueeze(1).unsqueeze(-1).to(query.dtype);
        }
        var key = cat([kvSplit[0], kRotE], -1);
        var mask = ctx.Mask(MaskKind.Full);
        if (_indexer is not null)
        {
            // When index_topk covers every key the selection keeps them all and leaves the mask as it is: skip the
            // scores (heads × S × T floats per layer) for the same result.
            ctx.IndexerTopK = _indexer.KeepsEveryKey(key.shape[2]) ? null : _indexer.TopK(x, qResid, mask, _rope, ctx);
            if (ctx.IndexerTopK is not null) mask = DsaIndexer.Restrict(mask, ctx.IndexerTopK);
        }
        else if (_reusesTopK && ctx.IndexerTopK is not null)
        {
            // A reusing layer always follows an indexer layer (Core refuses a "shared" first layer); null: it kept all keys.
            mask = DsaIndexer.Restrict(mask, ctx.IndexerTopK);
        }
        // Sinks join an eager softmax (HY-V4 supports only eager attention, as gpt-oss' sinks).
        var o = _sinks is null ? AttentionMath.Attend(query, key, kvSplit[1], ctx, mask, _scaling)
            : AttentionMath.Eager(query, key, kvSplit[1], mask, _scaling, _sinks);
        // HYV4Attention: the output times sigmoid(gate_proj(x)) per element, in the activations' dtype.
        if (_gate is not null) o = o * nn.functional.sigmoid(_gate.Forward(x));
        // AXK2Attention: the output times sigmoid(gate) in fp32, cast back, before o_proj.
        if (gate is not null) o = (o * nn.functional.sigmoid(gate.to(ScalarType.Float32))).to(o.dtype);
        return _o.Forward(o);
    }

    // q [B, heads, S, r] and k [B, 1, S, r]: DeepSeek-V2 rotates complex pairs (its helper wants heads after S),
    // the others rotate halves, de-interleaved first under rope_interleave.
    (Tensor Q, Tensor K) Rotate(Tensor q, Tensor k, ForwardContext ctx)
    {
        if (_complexPairs)
        {
            var freqs = _rope.Freqs(ctx.Positions);
            return (Rotary.ApplyComplexPairs(q.transpose(1, 2), freqs, _rope.AttentionScaling).transpose(1, 2),
                Rotary.ApplyComplexPairs(k.transpose(1, 2), freqs, _rope.AttentionScaling).transpose(1, 2));
        }
        if (!_interleave)
        {
            var rotation = _rope.Half(ctx, ctx.DType);
            return (rotation.Apply(q), rotation.Apply(k));
        }
        var (cos, sin) = _rope.CosSin(ctx.Positions, ctx.DType);
        return (Rotary.ApplyInterleaved(q, cos, sin), Rotary.ApplyInterleaved(k, cos, sin));
    }
}
