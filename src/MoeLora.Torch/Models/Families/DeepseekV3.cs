using MoeLora.Torch.Nn;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Models.Families;

/// <summary>
/// deepseek_v3: MLA attention (low-rank q via q_a/q_b with q_a_layernorm, compressed kv via kv_a_proj_with_mqa and
/// kv_b_proj, decoupled rope on qk_rope_head_dim, optional interleaved rope), dense MLP for the first
/// <c>first_k_dense_replace</c> layers, then MoE: sigmoid scores, group-limited top-k on scores +
/// <c>e_score_correction_bias</c> (a persistent buffer), weights from the uncorrected scores, optional
/// renormalisation (+1e-20), times <c>routed_scaling_factor</c>; shared experts always added.
/// </summary>
internal sealed class DeepseekV3 : IModelFamily
{
    public string ModelType => "deepseek_v3";

    public CausalLm Build(ModelConfig c, Init init)
    {
        var rope = Rotary.FromConfig(c, c.Long("qk_rope_head_dim"));
        long dense = c.LongOr("first_k_dense_replace", 0);
        return new CausalLm(c, init, i =>
        {
            HfModule ff = i >= dense ? new DeepseekV3Moe(c, init) : new GatedMlp(c.HiddenSize, c.Long("intermediate_size"), c.HiddenAct, init);
            return new DecoderLayer(new MlaAttention(c, rope, init), "mlp", ff,
                new RmsNorm(c.HiddenSize, c.RmsEps, init), new RmsNorm(c.HiddenSize, c.RmsEps, init));
        }, new RmsNorm(c.HiddenSize, c.RmsEps, init));
    }
}

internal sealed class MlaAttention : HfModule, IBlock
{
    // DeepseekV3RMSNorm(q_lora_rank) / (kv_lora_rank) use the class default eps, not rms_norm_eps.
    const double LowRankNormEps = 1e-6;
    readonly Linear? _q, _qa, _qb;
    readonly RmsNorm? _qaNorm;
    readonly Linear _kva, _kvb, _o;
    readonly RmsNorm _kvaNorm;
    readonly long _heads, _nope, _ropeDim, _v, _kvRank;
    readonly bool _interleave;
    readonly double _scaling;
    readonly Rotary _rope;

    public MlaAttention(ModelConfig c, Rotary rope, Init init)
    {
        _rope = rope;
        _heads = c.NumHeads; _nope = c.Long("qk_nope_head_dim"); _ropeDim = c.Long("qk_rope_head_dim");
        _v = c.Long("v_head_dim"); _kvRank = c.Long("kv_lora_rank");
        long qk = _nope + _ropeDim, h = c.HiddenSize;
        bool bias = c.BoolOr("attention_bias", false);
        var qRank = c.LongOrNull("q_lora_rank");
        if (qRank is null) _q = AddChild("q_proj", new Linear(h, _heads * qk, false, init));
        else
        {
            _qa = AddChild("q_a_proj", new Linear(h, qRank.Value, bias, init));
            _qaNorm = AddChild("q_a_layernorm", new RmsNorm(qRank.Value, LowRankNormEps, init));
            _qb = AddChild("q_b_proj", new Linear(qRank.Value, _heads * qk, false, init));
        }
        _kva = AddChild("kv_a_proj_with_mqa", new Linear(h, _kvRank + _ropeDim, bias, init));
        _kvaNorm = AddChild("kv_a_layernorm", new RmsNorm(_kvRank, LowRankNormEps, init));
        _kvb = AddChild("kv_b_proj", new Linear(_kvRank, _heads * (_nope + _v), false, init));
        _o = AddChild("o_proj", new Linear(_heads * _v, h, bias, init));
        _interleave = c.BoolOr("rope_interleave", true);
        _scaling = Math.Pow(qk, -0.5);
        var rp = c.RopeParameters;
        if (rp.Type == "yarn" && rp.MScaleAllDim is { } mad && mad != 0 && rp.Factor is { } f && f > 1)
        {
            double m = 0.1 * mad * Math.Log(f) + 1.0;
            _scaling *= m * m;
        }
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

internal sealed class DeepseekV3Router : HfModule
{
    public Parameter weight { get; }
    public Tensor e_score_correction_bias { get; }
    readonly List<IParamDelta> _deltas = [];
    internal void AttachDelta(IParamDelta d) => _deltas.Add(d);
    public Tensor EffectiveWeight() => ParamDeltas.Apply(weight, _deltas);
    public DeepseekV3Router(long experts, long hidden, Init init)
    {
        weight = AddParameter("weight", init.Normal(experts, hidden));
        e_score_correction_bias = AddBuffer("e_score_correction_bias", zeros(experts, ScalarType.Float32, init.Device));
    }
}

internal sealed class DeepseekV3Moe : HfModule, IBlock
{
    readonly FusedExperts _experts;
    readonly DeepseekV3Router _gate;
    readonly GatedMlp _shared;
    readonly long _experts_n, _topK, _groups, _topKGroups;
    readonly bool _norm;
    readonly double _scale;

    public DeepseekV3Moe(ModelConfig c, Init init)
    {
        _experts_n = c.Long("n_routed_experts"); _topK = c.Long("num_experts_per_tok");
        _groups = c.LongOr("n_group", 1); _topKGroups = c.LongOr("topk_group", 1);
        _norm = c.BoolOr("norm_topk_prob", true); _scale = c.DoubleOr("routed_scaling_factor", 1.0);
        long inter = c.Long("moe_intermediate_size");
        _experts = AddChild("experts", new FusedExperts(_experts_n, c.HiddenSize, inter, c.HiddenAct, init));
        _gate = AddChild("gate", new DeepseekV3Router(_experts_n, c.HiddenSize, init));
        _shared = AddChild("shared_experts", new GatedMlp(c.HiddenSize, inter * c.LongOr("n_shared_experts", 1), c.HiddenAct, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var shape = x.shape;
        var flat = x.reshape(-1, shape[^1]);
        var logits = nn.functional.linear(flat.to(ScalarType.Float32), _gate.EffectiveWeight().to(ScalarType.Float32));
        ctx.RouterLogits.Add(logits);
        var scores = logits.sigmoid();
        Tensor topIdx;
        using (no_grad())
        {
            var choice = scores.view(-1, _experts_n) + _gate.e_score_correction_bias.unsqueeze(0);
            long per = _experts_n / _groups;
            var groupScores = choice.view(-1, _groups, per).topk(Math.Min(2, (int)per), -1).values.sum(-1);
            var groupIdx = groupScores.topk((int)_topKGroups, -1, sorted: false).indexes;
            var groupMask = zeros_like(groupScores).scatter(1, groupIdx, ones_like(groupIdx, groupScores.dtype));
            var scoreMask = groupMask.unsqueeze(-1).expand(-1, _groups, per).reshape(-1, _experts_n);
            choice = choice.masked_fill(scoreMask.logical_not(), 0.0);
            topIdx = choice.topk((int)_topK, -1, sorted: false).indexes;
        }
        var topW = scores.gather(1, topIdx);
        if (_norm) topW = topW / (topW.sum(-1, keepdim: true) + 1e-20);
        topW = topW * _scale;
        var routed = _experts.Forward(flat, topIdx, topW).to(x.dtype);
        return (routed + _shared.Forward(flat)).view(shape);
    }
}
