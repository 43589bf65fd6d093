using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// A router module holding <c>weight [E, H]</c> and, where the family puts it there, its selection bias: a
/// Parameter or persistent buffer registered after the weight (Laguna, MiniMax-M3), or a Parameter <c>[1, E]</c> of a
/// <c>moe_statics</c> submodule (ERNIE 4.5).
/// </summary>
public sealed class ScoredRouter : HfModule
{
    public Parameter weight { get; }
    readonly Tensor? _bias;
    readonly MoeStatics? _statics;
    readonly List<IParamDelta> _deltas = [];

    /// <summary>The selection bias as <c>[E]</c> (read at forward time: the statics' <c>[1, E]</c> view is not kept).</summary>
    public Tensor? SelectionBias => _statics is not null ? _statics.Bias.squeeze(0) : _bias;

    /// <summary>DeepSeek-V4's hash routing table <c>tid2eid [vocab, k]</c> (int64): each token id's experts; null: learned routing.</summary>
    public Tensor? HashTable { get; }

    /// <param name="hash">A persistent <c>tid2eid</c> buffer of (vocab, k) (DeepseekV4HashRouter), registered after the weight.</param>
    public ScoredRouter(long experts, long hidden, ScoreBias? bias, Init init, (long Vocab, long TopK)? hash = null)
    {
        weight = AddParameter("weight", init.Normal(experts, hidden));
        if (hash is { } h) HashTable = AddBuffer("tid2eid", zeros(h.Vocab, h.TopK, ScalarType.Int64, init.Device));
        if (bias is { Owner: ScoreBiasOwner.RouterStatics })
            _statics = AddChild("moe_statics", new MoeStatics(bias.Name, experts, init));
        else if (bias is not null)
            _bias = bias.IsParameter ? AddParameter(bias.Name, zeros(experts, ScalarType.Float32, init.Device))
                : AddBuffer(bias.Name, zeros(experts, ScalarType.Float32, init.Device));
    }

    /// <summary>Attaches a 2-D ParamWrapper delta to <c>weight</c> (target_parameters on the router).</summary>
    internal void AttachDelta(IParamDelta d) => _deltas.Add(d);
    public Tensor Logits(Tensor x) => nn.functional.linear(x, ParamDeltas.Apply(weight, _deltas));
    public Tensor EffectiveWeight() => ParamDeltas.Apply(weight, _deltas);
}

/// <summary>
/// LongCat-Flash's router module: the persistent buffer <c>e_score_correction_bias [E]</c> and an nn.Linear child
/// (<c>classifier</c>). Its logits read the Linear's weight directly, in fp32, as <c>F.linear(x.float(),
/// classifier.weight.float())</c> does: the Linear's bias and any LoRA wrapped around it take no part.
/// </summary>
public sealed class BiasedLinearRouter : HfModule
{
    public Tensor SelectionBias { get; }
    public Linear Classifier { get; }

    public BiasedLinearRouter(SoftmaxBiasRouterSettings s, long hidden, Init init)
    {
        SelectionBias = AddBuffer("e_score_correction_bias", zeros(s.NumExperts, ScalarType.Float32, init.Device));
        Classifier = AddChild(s.LinearName, new Linear(hidden, s.NumExperts, s.LinearBias, init));
    }

    public Tensor Logits(Tensor x) => nn.functional.linear(x.to(ScalarType.Float32), Classifier.weight.to(ScalarType.Float32));
}

/// <summary>ERNIE 4.5's <c>Ernie4_5_MoeStatics</c>: one frozen Parameter <c>[1, E]</c>.</summary>
public sealed class MoeStatics : HfModule
{
    public Parameter Bias { get; }
    public MoeStatics(string name, long experts, Init init) => Bias = AddParameter(name, init.Zeros(1, experts));
}

/// <summary>
/// The MoE block of the routers in RouterKinds.cs: <see cref="TopKLogitsRouterSettings"/> (top-k of the logits, then
/// softmax or sigmoid of those k: Cohere2-MoE, GraniteMoE), <see cref="SigmoidBiasRouterSettings"/> (sigmoid scores,
/// bias-corrected selection: AFMoE, Laguna, MiniMax-M2/M3, HY V3), <see cref="SparseMixerRouterSettings"/> (PhiMoE),
/// <see cref="SoftmaxStaticsTopKRouterSettings"/> (ERNIE 4.5), <see cref="LinearSoftmaxTopKRouterSettings"/>
/// (HunYuan), <see cref="SoftmaxBiasRouterSettings"/> (LongCat-Flash, whose experts include identity ones) and
/// <see cref="SoftmaxTopKRouterSettings"/> whose router is an nn.Linear (Jamba), <see cref="ScoreFunctionRouterSettings"/>
/// (DeepSeek-V4's top-k and hash routers). Routed
/// experts are the transformers-5 fused experts (plain or clamped SwiGLU) or Aria's grouped GEMM; an ungated shared expert
/// is summed (averaged, or added in fp32: <see cref="MoeOptions"/>) with the routed output. The router logits recorded
/// are the router's returned logits ([T, E]).
/// </summary>
public sealed class RoutedMoe : HfModule, IBlock
{
    readonly RouterSettings _r;
    readonly MoeOptions _o;
    readonly HfModule _router;
    readonly Tensor? _blockBias;
    readonly HfModule _experts;
    readonly HfModule? _shared;

    public RoutedMoe(long hidden, MoeSettings s, Init init)
    {
        _r = s.Router;
        _o = s.Options ?? new MoeOptions();
        if (_o.OutputNorm is not null) throw new NotSupportedException("a MoE output norm has a runtime block only with the group-limited routers.");
        var bias = s.Router switch
        {
            SigmoidBiasRouterSettings b => b.Bias,
            SoftmaxStaticsTopKRouterSettings => new ScoreBias("e_score_correction_bias", ScoreBiasOwner.RouterStatics, IsParameter: true),
            ScoreFunctionRouterSettings { HashVocab: null } => new ScoreBias("e_score_correction_bias", ScoreBiasOwner.Router, IsParameter: false),
            _ => null,
        };
        // A block-owned selection bias is registered on the block itself, before its children (AFMoE's expert_bias).
        if (bias is { Owner: ScoreBiasOwner.Block })
            _blockBias = bias.IsParameter ? AddParameter(bias.Name, zeros(s.Router.NumExperts, ScalarType.Float32, init.Device))
                : AddBuffer(bias.Name, zeros(s.Router.NumExperts, ScalarType.Float32, init.Device));
        bool linear = s.Router switch
        {
            TopKLogitsRouterSettings t => t.LinearModule,
            SoftmaxTopKRouterSettings st => st.LinearModule ? true : throw new NotSupportedException("a TopKRouter module runs in SoftmaxTopKMoe."),
            SigmoidBiasRouterSettings b => b.LinearModule,
            SparseMixerRouterSettings or LinearSoftmaxTopKRouterSettings => true,
            SoftmaxStaticsTopKRouterSettings or SoftmaxBiasRouterSettings or ScoreFunctionRouterSettings => false,
            _ => throw new NotSupportedException($"router settings {s.Router.GetType().Name} have no RoutedMoe block."),
        };
        // Routers transformers keeps in fp32 whatever the model dtype (ERNIE: _keep_in_fp32_modules_strict; HunYuan:
        // its gate Linear is created with dtype=torch.float32).
        var routerInit = s.Router is SoftmaxStaticsTopKRouterSettings or LinearSoftmaxTopKRouterSettings ? init with { DType = ScalarType.Float32 } : init;
        _router = s.Router is SoftmaxBiasRouterSettings sb ? new BiasedLinearRouter(sb, hidden, init)
            : linear ? new Linear(hidden, s.Router.NumExperts, false, routerInit)
            : new ScoredRouter(s.Router.NumExperts, hidden, bias is { Owner: not ScoreBiasOwner.Block } ? bias : null, routerInit,
                s.Router is ScoreFunctionRouterSettings { HashVocab: { } vocab } ? (vocab, s.Router.TopK) : null);
        // HunYuan's Linear is nested in its gate module (gate.wg), like AFMoE's router.gate.
        var routerPath = s.Router is LinearSoftmaxTopKRouterSettings h ? $"{h.Name}.{h.LinearName}" : s.Router.Name;
        _experts = s.Experts.Layout switch
        {
            ExpertsLayout.GateUpOutIn => new FusedExperts(s.Experts.NumExperts, hidden, s.Experts.Intermediate, s.Experts.Act, init, s.Experts.ZeroExperts),
            ExpertsLayout.GateUpOutInClamped => new ClampedFusedExperts(s.Experts.NumExperts, hidden, s.Experts.Intermediate, s.Experts.SwigluLimit, s.Experts.SwigluAlpha, init,
                s.Experts.SwigluUpShift, s.Experts.ClampAfterActivation),
            ExpertsLayout.GroupedGemmInOut => new GroupedGemmExperts(s.Experts.NumExperts, hidden, s.Experts.Intermediate, init),
            _ => throw new NotSupportedException($"{s.Router.GetType().Name} with {s.Experts.Layout} experts has no runtime block."),
        };
        if (s.Shared?.SigmoidGateName is not null) throw new NotSupportedException($"a gated shared expert with {s.Router.GetType().Name} has no runtime block yet.");
        if (s.Shared is { FusedGateUp: true, Bias: true }) throw new NotSupportedException("a fused gate/up shared expert with biases has no runtime block.");
        HfModule? shared = s.Shared is not { } sh ? null
            : sh.FusedGateUp ? new FusedGateUpMlp(hidden, new FusedGateUpMlpSettings(sh.Intermediate, sh.Act, "gate_up_proj", "down_proj", null,
                s.Experts.Layout == ExpertsLayout.GateUpOutInClamped ? s.Experts.SwigluLimit : null, s.Experts.SwigluAlpha), init)
            : new GatedMlp(hidden, sh.Intermediate, sh.Act, init, sh.Bias, sh.ActName, clampLimit: sh.ClampLimit, clampAfterActivation: sh.ClampAfterActivation);
        void AddRouter()
        {
            var parts = routerPath.Split('.');
            HfModule owner = this;
            for (int i = 0; i < parts.Length - 1; i++) owner = Nest(owner, parts[i]);
            Attach(owner, parts[^1], _router);
        }
        if (s.Order == MoeOrder.ExpertsFirst) { AddChild("experts", _experts); AddRouter(); }
        else
        {
            AddRouter();
            if (_o.SharedFirst && shared is not null) _shared = AddChild(s.Shared!.Name, shared);
            AddChild("experts", _experts);
        }
        if (shared is not null && _shared is null) _shared = AddChild(s.Shared!.Name, shared);
    }

    static HfModule Nest(HfModule owner, string name) => Attach(owner, name, new Container());
    static T Attach<T>(HfModule owner, string name, T child) where T : HfModule =>
        owner is Container c ? c.Add(name, child) : ((RoutedMoe)owner).AddChild(name, child);

    Tensor RouterLogits(Tensor flat)
    {
        // fp32 routers read fp32 input (ERNIE, HunYuan: the Linear's dtype decides; HY V3 casts input and weight).
        if (_r is SigmoidBiasRouterSettings { LinearInFp32: true } && _router is ScoredRouter sr)
            return nn.functional.linear(flat.to(ScalarType.Float32), sr.EffectiveWeight().to(ScalarType.Float32));
        if (_router is Linear l) return l.Forward(flat.to(l.weight.dtype));
        if (_router is BiasedLinearRouter br) return br.Logits(flat);
        var g = (ScoredRouter)_router;
        return g.Logits(flat.to(g.weight.dtype));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var shape = x.shape;
        var flat = x.reshape(-1, shape[^1]);
        var logits = RouterLogits(flat);
        Tensor topIdx, topW;
        bool record = true;
        switch (_r)
        {
            case TopKLogitsRouterSettings t:
                (logits, topIdx, topW) = TopKOfLogits(t, logits, x.dtype);
                break;
            case SigmoidBiasRouterSettings b:
                // LFM2 scores in the logits' dtype (bf16 in training); the others in fp32.
                var l32 = b.ScoresInModelDtype ? logits : logits.to(ScalarType.Float32);
                if (b.SoftCap > 0) l32 = (l32 / b.SoftCap).tanh() * b.SoftCap;
                if (b.SoftCap > 0) logits = l32;
                var scores = l32.sigmoid();
                var sel = _blockBias ?? ((ScoredRouter)_router).SelectionBias;
                using (no_grad()) topIdx = (sel is null ? scores : scores + sel.to(ScalarType.Float32)).topk((int)b.TopK, -1).indexes;
                topW = scores.gather(1, topIdx);
                if (b.NormTopK) topW = topW / (topW.sum(-1, keepdim: true) + b.NormEps);
                if (b.Scale != 1.0) topW = topW * b.Scale;
                if (b.WeightsToModelDtype) topW = topW.to(x.dtype);
                break;
            case SparseMixerRouterSettings m:
                (topW, topIdx) = SparseMixer(logits, m.JitterEps);
                break;
            case SoftmaxStaticsTopKRouterSettings st:
            {
                // ERNIE: softmax in fp32, selection on softmax + statics bias, renormalised with a clamped sum.
                var probs = logits.softmax(1, ScalarType.Float32);
                using (no_grad()) topIdx = (probs + ((ScoredRouter)_router).SelectionBias!.to(ScalarType.Float32)).topk((int)st.TopK, -1).indexes;
                topW = probs.gather(-1, topIdx);
                topW = (topW / topW.sum(-1, keepdim: true).clamp_min(st.NormMin)).to(x.dtype);
                break;
            }
            case SoftmaxBiasRouterSettings sb:
            {
                // LongcatFlashTopkRouter: softmax of the fp32 logits, selection on softmax + bias, weights from the softmax
                // times routed_scaling_factor, neither renormalised nor cast back (they stay fp32).
                var probs = logits.softmax(-1);
                using (no_grad()) topIdx = (probs + ((BiasedLinearRouter)_router).SelectionBias).topk((int)sb.TopK, -1).indexes;
                topW = probs.gather(1, topIdx) * sb.Scale;
                break;
            }
            case SoftmaxTopKRouterSettings st:
                // JambaSparseMoeBlock.route_tokens_to_experts: softmax over all experts in fp32, top-k, cast to the
                // hidden dtype (optionally renormalised first, as the TopKRouter form does).
                (topW, topIdx) = logits.softmax(-1, ScalarType.Float32).topk((int)st.TopK, -1);
                if (st.NormTopK) topW = topW / topW.sum(-1, keepdim: true);
                topW = topW.to(x.dtype);
                break;
            case LinearSoftmaxTopKRouterSettings h:
                // HunYuan: softmax of the fp32 logits, top-k, renormalised, kept in the logits' dtype.
                (topW, topIdx) = logits.softmax(1, ScalarType.Float32).topk((int)h.TopK, -1);
                topW = (topW / topW.sum(-1, keepdim: true)).to(logits.dtype);
                break;
            case ScoreFunctionRouterSettings f:
            {
                // DeepseekV4TopKRouter / DeepseekV4HashRouter: scores in the logits' dtype; the hash table or the top-k of
                // scores + fp32 bias picks the experts; weights renormalised (+1e-20) and scaled. transformers records
                // only the top-k routers' logits.
                var fScores = f.Score == RouterScoreFunction.SqrtSoftplus ? nn.functional.softplus(logits).sqrt() : nn.functional.sigmoid(logits);
                var router = (ScoredRouter)_router;
                if (router.HashTable is { } table)
                {
                    var ids = ctx.InputIds ?? throw new InvalidOperationException("a hash-routed MoE layer needs the input ids.");
                    topIdx = table.index_select(0, ids.flatten());
                    record = false;
                }
                else
                {
                    using (no_grad()) topIdx = (fScores + router.SelectionBias!).topk((int)f.TopK, -1).indexes;
                }
                topW = fScores.gather(1, topIdx);
                topW = topW / (topW.sum(-1, keepdim: true) + 1e-20) * f.Scale;
                break;
            }
            default:
                throw new NotSupportedException($"router settings {_r.GetType().Name} have no RoutedMoe block.");
        }
        if (record) ctx.RouterLogits.Add(logits);
        var routed = _experts switch
        {
            FusedExperts f => f.Forward(flat, topIdx, topW),
            ClampedFusedExperts c => c.Forward(flat, topIdx, topW),
            GroupedGemmExperts gg => gg.Forward(flat, topIdx, topW),
            _ => throw new InvalidOperationException(),
        };
        if (_o.RoutedScale != 1.0) routed = routed * _o.RoutedScale;
        if (_shared is not null)
        {
            var sh = _shared is GatedMlp g ? g.Forward(flat) : ((FusedGateUpMlp)_shared).Forward(flat);
            routed = _o.SumInFp32 ? (routed.to(ScalarType.Float32) + sh.to(ScalarType.Float32)).to(x.dtype)
                : _o.SharedAverage ? (routed + sh) / 2 : routed + sh;
        }
        return routed.view(shape);
    }

    /// <summary>
    /// <see cref="TopKLogitsRouterSettings"/>: top-k of the (optionally fp32) logits, then softmax or sigmoid of those
    /// k, cast to <paramref name="dtype"/>. Returns the logits as the router returns them (fp32 where cast).
    /// </summary>
    internal static (Tensor Logits, Tensor TopIdx, Tensor TopW) TopKOfLogits(TopKLogitsRouterSettings t, Tensor logits, ScalarType dtype)
    {
        if (t.LogitsInFp32) logits = logits.to(ScalarType.Float32);
        var (topW, topIdx) = logits.topk((int)t.TopK, -1);
        topW = t.Score switch
        {
            TopKScore.SoftmaxFp32 => topW.softmax(-1, ScalarType.Float32),
            TopKScore.Softmax => topW.softmax(-1),
            _ => nn.functional.sigmoid(topW),
        };
        if (t.Score == TopKScore.Sigmoid && t.NormTopK) topW = topW / topW.sum(-1, keepdim: true);
        return (logits, topIdx, topW.to(dtype));
    }

    /// <summary>
    /// PhiMoE's sparsemixer in eval: pick the arg-max; its weight is the softmax over the logits whose relative gap to
    /// the max, (max − s) / max(|s|, max), is at most 2·eps; then mask the first pick to −inf and repeat for the second.
    /// </summary>
    static (Tensor W, Tensor Idx) SparseMixer(Tensor scores, double eps)
    {
        Tensor Pick(Tensor masked, out Tensor idx)
        {
            Tensor threshold;
            using (no_grad())
            {
                var mx = masked.max(-1, keepdim: true);
                idx = mx.indexes;
                var factor = scores.abs().maximum(mx.values);
                threshold = ((mx.values - scores) / factor).gt(2 * eps);
            }
            var gates = masked.masked_fill(threshold, double.NegativeInfinity).softmax(-1);
            return gates.gather(-1, idx);
        }
        var w1 = Pick(scores, out var i1);
        var second = scores.scatter(-1, i1, full_like(i1, double.NegativeInfinity, scores.dtype));
        var w2 = Pick(second, out var i2);
        return (cat([w1, w2], -1), cat([i1, i2], -1));
    }
}

/// <summary>
/// The clamped SwiGLU on (gate, up): <c>g·sigmoid(α g)·(clamp(up, ±L) + shift)</c>, g = clamp(gate, max = L): MiniMax-M3's
/// with shift 1, HY-V4's <c>HYV4Experts._apply_gate</c> (silu(g) · clamp(up)) with α 1 and shift 0. With
/// <c>afterActivation</c> the activated gate is clamped instead, <c>clamp(g·sigmoid(α g), max = L)</c> (Step-3.7, α 1, shift 0).
/// </summary>
internal static class ClampedSwiglu
{
    /// <summary>On one tensor holding gate then up along its last dimension, with the activation <c>g·sigmoid(α g)</c>.</summary>
    public static Tensor Apply(Tensor gateUp, double limit, double alpha, double upShift = 1.0, bool afterActivation = false)
    {
        var gu = gateUp.chunk(2, -1);
        return Apply(gu[0], gu[1], limit, g => g * nn.functional.sigmoid(g * alpha), upShift, afterActivation);
    }

    /// <summary>
    /// On separate gate and up tensors with any activation (a dense MLP's own activation module: DeepSeek-V4's shared
    /// expert and Step-3.7's MLPs, shift 0).
    /// </summary>
    public static Tensor Apply(Tensor gate, Tensor up, double limit, Func<Tensor, Tensor> activation, double upShift = 0.0, bool afterActivation = false)
    {
        if (!afterActivation) gate = gate.clamp_max(limit);
        up = up.clamp(-limit, limit);
        if (upShift != 0.0) up = up + upShift;
        var activated = activation(gate);
        return up * (afterActivation ? activated.clamp_max(limit) : activated);
    }
}

/// <summary>A dense MLP with one fused gate/up Linear (<see cref="FusedGateUpMlpSettings"/>: GraniteMoeShared, MiniMax-M3).</summary>
public sealed class FusedGateUpMlp : HfModule, IBlock
{
    readonly Linear _gateUp, _down;
    readonly Activation? _act;
    readonly FusedGateUpMlpSettings _s;

    public FusedGateUpMlp(long hidden, FusedGateUpMlpSettings s, Init init)
    {
        _s = s;
        if (s.ActName is not null) _act = AddChild(s.ActName, new Activation(s.Act));
        _gateUp = AddChild(s.GateUpName, new Linear(hidden, 2 * s.Intermediate, false, init));
        _down = AddChild(s.DownName, new Linear(s.Intermediate, hidden, false, init));
    }

    public Tensor Forward(Tensor x)
    {
        var gu = _gateUp.Forward(x);
        if (_s.SwigluLimit is { } limit) return _down.Forward(ClampedSwiglu.Apply(gu, limit, _s.SwigluAlpha));
        var c = gu.chunk(2, -1);
        return _down.Forward((_act ?? new Activation(_s.Act)).Forward(c[0]) * c[1]);
    }

    public Tensor Forward(Tensor x, ForwardContext ctx) => Forward(x);
}

/// <summary>transformers-5 fused experts (<c>gate_up_proj [E, 2I, H]</c>, <c>down_proj [E, H, I]</c>) with the clamped SwiGLU (MiniMax-M3, HY-V4).</summary>
public sealed class ClampedFusedExperts : ExpertsBase
{
    readonly double _limit, _alpha, _upShift;
    readonly bool _afterActivation;
    public override bool IsTransposed => false;

    public ClampedFusedExperts(long experts, long hidden, long intermediate, double limit, double alpha, Init init, double upShift = 1.0,
        bool afterActivation = false)
    {
        NumExperts = experts; _limit = limit; _alpha = alpha; _upShift = upShift; _afterActivation = afterActivation;
        AddParameter("gate_up_proj", init.Normal(experts, 2 * intermediate, hidden));
        AddParameter("down_proj", init.Normal(experts, hidden, intermediate));
    }

    public Tensor Forward(Tensor x, Tensor topIdx, Tensor topW)
    {
        if (Dispatching == ExpertDispatch.Loop)
        {
            var gateUp = Effective("gate_up_proj");
            var down = Effective("down_proj");
            Tensor? final = null;
            foreach (var (e, tok, slot) in Dispatch(topIdx, NumExperts))
            {
                var h = nn.functional.linear(ClampedSwiglu.Apply(nn.functional.linear(x.index_select(0, tok), gateUp[e]), _limit, _alpha, _upShift, _afterActivation), down[e]);
                var w = topW.index(TensorIndex.Tensor(tok), TensorIndex.Tensor(slot)).unsqueeze(-1);
                var hw = h * w;
                final = (final ?? zeros(x.shape, hw.dtype, x.device)).index_add(0, tok, hw, 1.0);
            }
            return final is null ? zeros_like(x) : final.to(x.dtype);
        }
        return Recomputed(x, topIdx, topW, ForwardGrouped);
    }

    Tensor ForwardGrouped(Tensor x, Grouping g, Tensor topW)
    {
        var y = RunExperts(g, x.index_select(0, g.TokenOf), (ops, xe) =>
            ops.Mm(ClampedSwiglu.Apply(ops.Mm(xe, "gate_up_proj", transposeWeight: true), _limit, _alpha, _upShift, _afterActivation), "down_proj", transposeWeight: true));
        var wt = topW.flatten().index_select(0, g.Order).unsqueeze(-1);
        // Summed in the weighted outputs' dtype, then cast: see FusedExperts.ForwardGrouped.
        var yw = y * wt;
        return zeros(x.shape, yw.dtype, x.device).index_add(0, g.TokenOf, yw, 1.0).to(x.dtype);
    }
}
