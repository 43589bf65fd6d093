using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// <c>InklingShortConvolution</c> without a cache (<c>causal_conv1d_fn</c>'s torch path): in fp32, padded positions
/// zeroed (<c>apply_mask_to_padding_states</c> with the 2-D padding mask of <c>create_recurrent_attention_mask</c>), a
/// causal depthwise Conv1d without bias, plus the unmasked input; cast back to the input's dtype. Its weight is fp32
/// whatever the model's dtype (transformers' <c>_keep_in_fp32_modules_strict</c>).
/// </summary>
public sealed class InklingShortConvolution : HfModule
{
    public DepthwiseConv1d conv1d { get; }

    public InklingShortConvolution(long channels, long kernel, Init init) =>
        conv1d = AddChild("conv1d", new DepthwiseConv1d(channels, kernel, init with { DType = ScalarType.Float32 }));

    /// <param name="x">[B, S, C]</param><param name="attentionMask">[B, S], 1 = real token</param>
    public Tensor Forward(Tensor x, Tensor attentionMask)
    {
        var residual = x.to(ScalarType.Float32);
        // Multiplying by an all-ones mask is exact, so the unpadded case (where transformers passes no mask) agrees.
        var h = residual * attentionMask.to(ScalarType.Float32).unsqueeze(-1);
        var w = conv1d.weight;
        long s = x.shape[1], k = w.shape[2];
        var y = nn.functional.conv1d(h.transpose(1, 2), w, null, stride: 1, padding: k - 1, dilation: 1, groups: w.shape[0])
            .narrow(2, 0, s).transpose(1, 2);
        return (y + residual).to(x.dtype);
    }
}

/// <summary><c>InklingRelativeLogits</c>: the bias bank <c>proj [d_rel, extent]</c>.</summary>
public sealed class InklingRelativeLogits : HfModule
{
    public Parameter proj { get; }
    readonly long _extent;

    public InklingRelativeLogits(long dRel, long extent, Init init)
    {
        _extent = extent;
        proj = AddParameter("proj", init.Normal(dRel, extent));
    }

    /// <summary>
    /// relative_states [B, S, heads, d_rel] → bias [B, heads, S, S]: each query's mix of the bank read at the distance
    /// query index − key index (sequence indices, not position ids, as transformers' arange positions), zero for
    /// negative distances and those beyond the bank.
    /// </summary>
    public Tensor Forward(Tensor relativeStates)
    {
        var rel = matmul(relativeStates, proj).transpose(1, 2);                       // [B, heads, S, extent]
        long s = relativeStates.shape[1];
        var idx = arange(s, ScalarType.Int64, relativeStates.device);
        var distance = idx.unsqueeze(-1) - idx.unsqueeze(0);                          // [S, S]
        var gatherIndex = distance.clamp(0, _extent - 1).expand(rel.shape[0], rel.shape[1], s, s);
        var outside = distance.lt(0) | distance.ge(_extent);
        return rel.gather(-1, gatherIndex).masked_fill(outside, 0.0);
    }
}

/// <summary>
/// <c>InklingAttention</c> (<see cref="InklingAttentionSettings"/>): k and v through their residual short
/// convolutions, q/k RMS-normed per head, no rope, scale 1 / head_dim, the relative-position bias added to the scores
/// (with the causal or sliding mask, through <see cref="AttentionMath.Attend(Tensor, Tensor, Tensor, ForwardContext, Tensor, double)"/>),
/// and on global layers the optional log scaling of queries and bias.
/// </summary>
public sealed class InklingAttention : HfModule, IBlock
{
    public Linear q_proj { get; }
    public Linear k_proj { get; }
    public Linear v_proj { get; }
    public Linear r_proj { get; }
    public Linear o_proj { get; }
    readonly InklingShortConvolution _kConv, _vConv;
    readonly RmsNorm _qNorm, _kNorm;
    readonly InklingRelativeLogits _rel;
    readonly InklingAttentionSettings _s;

    public InklingAttention(long hidden, InklingAttentionSettings s, Init init)
    {
        _s = s;
        q_proj = AddChild("q_proj", new Linear(hidden, s.Heads * s.HeadDim, false, init));
        k_proj = AddChild("k_proj", new Linear(hidden, s.KvHeads * s.HeadDim, false, init));
        v_proj = AddChild("v_proj", new Linear(hidden, s.KvHeads * s.HeadDim, false, init));
        r_proj = AddChild("r_proj", new Linear(hidden, s.Heads * s.DRel, false, init));
        o_proj = AddChild("o_proj", new Linear(s.Heads * s.HeadDim, hidden, false, init));
        _kConv = AddChild("k_sconv", new InklingShortConvolution(s.KvHeads * s.HeadDim, s.ConvKernel, init));
        _vConv = AddChild("v_sconv", new InklingShortConvolution(s.KvHeads * s.HeadDim, s.ConvKernel, init));
        _qNorm = AddChild("q_norm", new RmsNorm(s.HeadDim, s.NormEps, init));
        _kNorm = AddChild("k_norm", new RmsNorm(s.HeadDim, s.NormEps, init));
        _rel = AddChild("rel_logits_proj", new InklingRelativeLogits(s.DRel, s.RelExtent, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1], d = _s.HeadDim;
        var q = _qNorm.Forward(q_proj.Forward(x).view(b, s, -1, d)).transpose(1, 2);
        var k = _kNorm.Forward(_kConv.Forward(k_proj.Forward(x), ctx.AttentionMask).view(b, s, -1, d)).transpose(1, 2);
        var v = _vConv.Forward(v_proj.Forward(x), ctx.AttentionMask).view(b, s, -1, d).transpose(1, 2);
        var bias = _rel.Forward(r_proj.Forward(x).view(b, s, _s.Heads, -1));
        if (_s.LogScaling is { } ls)
        {
            // tau = 1 + alpha·log(max((i + 1) / n_floor, 1)) per query index, applied in fp32 (as the original).
            var n = arange(1, s + 1, ScalarType.Float32, x.device);
            var tau = ((n / ls.NFloor).clamp_min(1.0).log() * ls.Alpha + 1.0).view(1, 1, -1, 1);
            q = (q.to(ScalarType.Float32) * tau).to(q.dtype);
            bias = (bias.to(ScalarType.Float32) * tau).to(bias.dtype);
        }
        var o = AttentionMath.Attend(q, k, v, ctx, ctx.Mask(_s.Mask) + bias, 1.0 / d);
        return o_proj.Forward(o);
    }
}

/// <summary>
/// <c>InklingTopkRouter</c>: <c>weight [E + S, H]</c>, <c>global_scale [1]</c>, and the persistent buffer
/// <c>e_score_correction_bias [E]</c> (selection only).
/// </summary>
public sealed class InklingTopkRouter : HfModule, IParamDeltaOwner
{
    public Parameter weight { get; }
    public Parameter global_scale { get; }
    public Tensor SelectionBias { get; }
    readonly List<IParamDelta> _deltas = [];

    public InklingTopkRouter(long routed, long shared, long hidden, Init init)
    {
        weight = AddParameter("weight", init.Normal(routed + shared, hidden));
        global_scale = AddParameter("global_scale", init.Ones(1));
        SelectionBias = AddBuffer("e_score_correction_bias", zeros(routed, ScalarType.Float32, init.Device));
    }

    void IParamDeltaOwner.AttachDelta(string parameterName, IParamDelta delta)
    {
        if (parameterName != "weight")
            throw new NotSupportedException($"target_parameters on '{parameterName}' of InklingTopkRouter is not supported ('weight' only).");
        _deltas.Add(delta);
    }

    public Tensor Logits(Tensor x) => nn.functional.linear(x, ParamDeltas.Apply(weight, _deltas));
}

/// <summary>
/// <c>InklingSharedExperts</c>: S always-on experts as 3-D Parameters gate_proj / up_proj [S, I, H] and down_proj
/// [S, H, I] ((out, in) per expert, PEFT's non-transposed layout), each weighted per token by its router gamma; the S
/// outputs are summed in fp32. It runs on every token, so it is not a routed module of its own.
/// </summary>
public sealed class InklingSharedExperts : ExpertsBase
{
    readonly Activation _act;
    public override bool IsTransposed => false;
    public override bool SharesRouting => true;

    public InklingSharedExperts(long shared, long hidden, long intermediate, string act, Init init)
    {
        NumExperts = shared;
        AddParameter("gate_proj", init.Normal(shared, intermediate, hidden));
        AddParameter("up_proj", init.Normal(shared, intermediate, hidden));
        AddParameter("down_proj", init.Normal(shared, hidden, intermediate));
        _act = AddChild("act_fn", new Activation(act));
    }

    /// <param name="x">[T, H]</param><param name="gammas">[T, S]</param>
    public Tensor Forward(Tensor x, Tensor gammas)
    {
        long t = x.shape[0];
        LastSelectedCounts = Enumerable.Repeat(t, (int)NumExperts).ToArray();
        var xs = x.unsqueeze(0).expand(NumExperts, -1, -1);                              // [S, T, H]
        var g = gammas.transpose(0, 1).unsqueeze(-1);                                     // [S, T, 1]
        var gate = bmm(xs, Effective("gate_proj").transpose(1, 2));
        var up = bmm(xs, Effective("up_proj").transpose(1, 2));
        var down = bmm(_act.Forward(gate) * up * g, Effective("down_proj").transpose(1, 2));
        // sum(0) would bind to sum(ScalarType): the dimension is named.
        return down.to(ScalarType.Float32).sum(dim: 0).to(x.dtype);
    }
}

/// <summary>
/// <c>InklingMoE</c> (<see cref="InklingMoeSettings"/>): gate, experts, shared_experts. The router's selection is
/// <c>topk(sigmoid(routed logits) + e_score_correction_bias)</c>; the weights are the softmax of the log-sigmoids of
/// the k chosen routed logits and of the S shared logits together (<c>exp(l − logsumexp(l))</c>), times route_scale and
/// global_scale. Recorded router logits: the routed ones [T, E].
/// </summary>
public sealed class InklingMoe : HfModule, IBlock
{
    public InklingTopkRouter gate { get; }
    public FusedExperts experts { get; }
    public InklingSharedExperts shared_experts { get; }
    readonly InklingMoeSettings _s;

    public InklingMoe(long hidden, InklingMoeSettings s, Init init)
    {
        _s = s;
        gate = AddChild("gate", new InklingTopkRouter(s.NumExperts, s.SharedExperts, hidden, init));
        experts = AddChild("experts", new FusedExperts(s.NumExperts, hidden, s.Intermediate, s.Act, init));
        shared_experts = AddChild("shared_experts", new InklingSharedExperts(s.SharedExperts, hidden, s.Intermediate, s.Act, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var shape = x.shape;
        var flat = x.reshape(-1, shape[^1]);
        var (topW, topIdx, gammas) = Route(flat, ctx);
        var routed = experts.Forward(flat, topIdx, topW);
        return (routed + shared_experts.Forward(flat, gammas)).view(shape);
    }

    /// <summary>InklingTopkRouter.forward: (routed weights [T, k], routed indices [T, k], shared gammas [T, S]).</summary>
    internal (Tensor TopW, Tensor TopIdx, Tensor Gammas) Route(Tensor flat, ForwardContext? ctx = null)
    {
        long e = _s.NumExperts;
        var logits = gate.Logits(flat);                                                   // [T, E + S]
        var routedLogits = logits.narrow(-1, 0, e);
        var sharedLogits = logits.narrow(-1, e, _s.SharedExperts);
        Tensor topIdx;
        using (no_grad()) topIdx = (routedLogits.sigmoid() + gate.SelectionBias).topk((int)_s.TopK, -1).indexes;
        var chosen = cat([routedLogits.gather(-1, topIdx), sharedLogits], -1);
        var logProbs = nn.functional.logsigmoid(chosen);
        var weights = (logProbs - logProbs.logsumexp(-1, keepdim: true)).exp() * _s.RouteScale * gate.global_scale;
        ctx?.RouterLogits.Add(routedLogits);
        return (weights.narrow(-1, 0, _s.TopK), topIdx, weights.narrow(-1, _s.TopK, _s.SharedExperts));
    }
}

/// <summary>
/// <c>InklingDecoderLayer</c>: the pre-norm layer with each sublayer's output passed through its residual short
/// convolution before the residual add (<see cref="SublayerConvs"/>); registered self_attn, mlp, input_layernorm,
/// post_attention_layernorm, attn_sconv, mlp_sconv.
/// </summary>
public sealed class InklingDecoderLayer : HfModule, IDecoderLayer
{
    readonly IBlock _attn, _ff;
    readonly RmsNorm _ln1, _ln2;
    readonly InklingShortConvolution _attnConv, _ffConv;

    public InklingDecoderLayer(HfModule attn, string ffName, HfModule ff, RmsNorm inputNorm, RmsNorm postNorm, SublayerConvs convs, long hidden, Init init)
    {
        _attn = (IBlock)AddChild("self_attn", attn);
        _ff = (IBlock)AddChild(ffName, ff);
        _ln1 = AddChild("input_layernorm", inputNorm);
        _ln2 = AddChild("post_attention_layernorm", postNorm);
        _attnConv = AddChild(convs.AfterAttention, new InklingShortConvolution(hidden, convs.Kernel, init));
        _ffConv = AddChild(convs.AfterFeedForward, new InklingShortConvolution(hidden, convs.Kernel, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var h = x + _attnConv.Forward(_attn.Forward(_ln1.Forward(x), ctx), ctx.AttentionMask);
        return h + _ffConv.Forward(_ff.Forward(_ln2.Forward(h), ctx), ctx.AttentionMask);
    }
}
