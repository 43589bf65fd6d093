using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// DeepSeek's multi-head latent attention (<see cref="MlaAttentionSettings"/>): low-rank q via q_a/q_b with
/// q_a_layernorm (or one q_proj), compressed kv via kv_a_proj_with_mqa and kv_b_proj, decoupled rope on the last
/// qk_rope_head_dim dims (optionally de-interleaved first), eager attention with the settings' scaling.
/// </summary>
public sealed class MlaAttention : HfModule, IBlock
{
    readonly Linear? _q, _qa, _qb;
    readonly RmsNorm? _qaNorm;
    readonly Linear _kva, _kvb, _o;
    readonly RmsNorm _kvaNorm;
    readonly long _heads, _nope, _ropeDim, _v, _kvRank;
    readonly bool _interleave;
    readonly double _scaling;
    readonly Rotary _rope;

    public MlaAttention(long hidden, MlaAttentionSettings s, Rotary rope, Init init)
    {
        _rope = rope;
        _heads = s.Heads; _nope = s.QkNopeHeadDim; _ropeDim = s.QkRopeHeadDim; _v = s.VHeadDim; _kvRank = s.KvLoraRank;
        long qk = _nope + _ropeDim;
        if (s.QLoraRank is not long qRank) _q = AddChild("q_proj", new Linear(hidden, _heads * qk, false, init));
        else
        {
            _qa = AddChild("q_a_proj", new Linear(hidden, qRank, s.Bias, init));
            _qaNorm = AddChild("q_a_layernorm", new RmsNorm(qRank, s.LowRankNormEps, init));
            _qb = AddChild("q_b_proj", new Linear(qRank, _heads * qk, false, init));
        }
        _kva = AddChild("kv_a_proj_with_mqa", new Linear(hidden, _kvRank + _ropeDim, s.Bias, init));
        _kvaNorm = AddChild("kv_a_layernorm", new RmsNorm(_kvRank, s.LowRankNormEps, init));
        _kvb = AddChild("kv_b_proj", new Linear(_kvRank, _heads * (_nope + _v), false, init));
        _o = AddChild("o_proj", new Linear(_heads * _v, hidden, s.Bias, init));
        _interleave = s.RopeInterleave;
        _scaling = s.Scaling;
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1];
        var q = _q is not null ? _q.Forward(x) : _qb!.Forward(_qaNorm!.Forward(_qa!.Forward(x)));
        q = q.view(b, s, -1, _nope + _ropeDim).transpose(1, 2);
        var qParts = q.split([_nope, _ropeDim], -1);
        var ckv = _kva.Forward(x);
        var kvParts = ckv.split([_kvRank, _ropeDim], -1);
        var kv = _kvb.Forward(_kvaNorm.Forward(kvParts[0])).view(b, s, -1, _nope + _v).transpose(1, 2);
        var kvSplit = kv.split([_nope, _v], -1);
        var kRot = kvParts[1].view(b, 1, s, _ropeDim);
        var (cos, sin) = _rope.CosSin(ctx.Positions, ctx.DType);
        Tensor qRot, kRotE;
        if (_interleave) { qRot = Rotary.ApplyInterleaved(qParts[1], cos, sin); kRotE = Rotary.ApplyInterleaved(kRot, cos, sin); }
        else { qRot = Rotary.ApplyHalf(qParts[1], cos, sin); kRotE = Rotary.ApplyHalf(kRot, cos, sin); }
        kRotE = kRotE.expand(b, _heads, s, _ropeDim);
        var query = cat([qParts[0], qRot], -1);
        var key = cat([kvSplit[0], kRotE], -1);
        var o = AttentionMath.Eager(query, key, kvSplit[1], ctx.Mask(MaskKind.Full), _scaling);
        return _o.Forward(o);
    }
}
