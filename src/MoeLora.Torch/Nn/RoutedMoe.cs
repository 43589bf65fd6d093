using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// A router module holding <c>weight [E, H]</c> and, where the family puts it there, its selection bias (a
/// Parameter or persistent buffer registered after the weight: Laguna, MiniMax-M3).
/// </summary>
public sealed class ScoredRouter : HfModule
{
    public Parameter weight { get; }
    public Tensor? SelectionBias { get; }
    readonly List<IParamDelta> _deltas = [];

    public ScoredRouter(long experts, long hidden, ScoreBias? bias, Init init)
    {
        weight = AddParameter("weight", init.Normal(experts, hidden));
        if (bias is not null)
            SelectionBias = bias.IsParameter ? AddParameter(bias.Name, zeros(experts, ScalarType.Float32, init.Device))
                : AddBuffer(bias.Name, zeros(experts, ScalarType.Float32, init.Device));
    }

    /// <summary>Attaches a 2-D ParamWrapper delta to <c>weight</c> (target_parameters on the router).</summary>
    internal void AttachDelta(IParamDelta d) => _deltas.Add(d);
    public Tensor Logits(Tensor x) => nn.functional.linear(x, ParamDeltas.Apply(weight, _deltas));
}

/// <summary>
/// The MoE block of the routers that are neither softmax-then-top-k nor group-limited:
/// <see cref="TopKLogitsRouterSettings"/> (top-k of the logits, then softmax or sigmoid of those k: Cohere2-MoE,
/// GraniteMoE), <see cref="SigmoidBiasRouterSettings"/> (sigmoid scores, bias-corrected selection: AFMoE, Laguna,
/// MiniMax-M2/M3) and <see cref="SparseMixerRouterSettings"/> (PhiMoE). Routed experts are the transformers-5 fused
/// experts (plain or clamped SwiGLU); a shared expert is summed (or averaged, <see cref="MoeOptions"/>) with the
/// routed output. The router logits recorded are the router's returned logits ([T, E]).
/// </summary>
public sealed class RoutedMoe : HfModule, IBlock
{
    readonly RouterSettings _r;
    readonly MoeOptions _o;
    readonly HfModule _router;
    readonly Tensor? _blockBias;
    readonly ExpertsBase _experts;
    readonly HfModule? _shared;

    public RoutedMoe(long hidden, MoeSettings s, Init init)
    {
        _r = s.Router;
        _o = s.Options ?? new MoeOptions();
        var bias = (s.Router as SigmoidBiasRouterSettings)?.Bias;
        // A block-owned selection bias is registered on the block itself, before its children (AFMoE's expert_bias).
        if (bias is { Owner: ScoreBiasOwner.Block })
            _blockBias = bias.IsParameter ? AddParameter(bias.Name, zeros(s.Router.NumExperts, ScalarType.Float32, init.Device))
                : AddBuffer(bias.Name, zeros(s.Router.NumExperts, ScalarType.Float32, init.Device));
        bool linear = s.Router switch
        {
            TopKLogitsRouterSettings t => t.LinearModule,
            SigmoidBiasRouterSettings b => b.LinearModule,
            SparseMixerRouterSettings => true,
            _ => throw new NotSupportedException($"router settings {s.Router.GetType().Name} have no RoutedMoe block."),
        };
        _router = linear ? new Linear(hidden, s.Router.NumExperts, false, init)
            : new ScoredRouter(s.Router.NumExperts, hidden, bias is { Owner: ScoreBiasOwner.Router } ? bias : null, init);
        _experts = s.Experts.Layout switch
        {
            ExpertsLayout.GateUpOutIn => new FusedExperts(s.Experts.NumExperts, hidden, s.Experts.Intermediate, s.Experts.Act, init),
            ExpertsLayout.GateUpOutInClamped => new ClampedFusedExperts(s.Experts.NumExperts, hidden, s.Experts.Intermediate, s.Experts.SwigluLimit, s.Experts.SwigluAlpha, init),
            _ => throw new NotSupportedException($"{s.Router.GetType().Name} with {s.Experts.Layout} experts has no runtime block."),
        };
        HfModule? shared = s.Shared is not { } sh ? null
            : _o.SharedFusedGateUp ? new FusedGateUpMlp(hidden, new FusedGateUpMlpSettings(sh.Intermediate, sh.Act, "gate_up_proj", "down_proj", null,
                s.Experts.Layout == ExpertsLayout.GateUpOutInClamped ? s.Experts.SwigluLimit : null, s.Experts.SwigluAlpha), init)
            : new GatedMlp(hidden, sh.Intermediate, sh.Act, init, actName: sh.ActName);
        if (s.Shared?.SigmoidGateName is not null) throw new NotSupportedException("a gated shared expert with this router has no runtime block yet.");
        void AddRouter()
        {
            var parts = s.Router.Name.Split('.');
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

    Tensor RouterLogits(Tensor flat) => _router is Linear l ? l.Forward(flat) : ((ScoredRouter)_router).Logits(flat);

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var shape = x.shape;
        var flat = x.reshape(-1, shape[^1]);
        var logits = RouterLogits(flat);
        Tensor topIdx, topW;
        switch (_r)
        {
            case TopKLogitsRouterSettings t:
                if (t.LogitsInFp32) logits = logits.to(ScalarType.Float32);
                (topW, topIdx) = logits.topk((int)t.TopK, -1);
                topW = t.Score switch
                {
                    TopKScore.SoftmaxFp32 => topW.softmax(-1, ScalarType.Float32),
                    TopKScore.Softmax => topW.softmax(-1),
                    _ => nn.functional.sigmoid(topW),
                };
                if (t.Score == TopKScore.Sigmoid && t.NormTopK) topW = topW / topW.sum(-1, keepdim: true);
                topW = topW.to(x.dtype);
                break;
            case SigmoidBiasRouterSettings b:
                var l32 = logits.to(ScalarType.Float32);
                if (b.SoftCap > 0) l32 = (l32 / b.SoftCap).tanh() * b.SoftCap;
                if (b.SoftCap > 0) logits = l32;
                var scores = l32.sigmoid();
                var sel = _blockBias ?? ((ScoredRouter)_router).SelectionBias!;
                using (no_grad()) topIdx = (scores + sel.to(ScalarType.Float32)).topk((int)b.TopK, -1).indexes;
                topW = scores.gather(1, topIdx);
                if (b.NormTopK) topW = topW / (topW.sum(-1, keepdim: true) + b.NormEps);
                if (b.Scale != 1.0) topW = topW * b.Scale;
                break;
            case SparseMixerRouterSettings m:
                (topW, topIdx) = SparseMixer(logits, m.JitterEps);
                break;
            default:
                throw new NotSupportedException($"router settings {_r.GetType().Name} have no RoutedMoe block.");
        }
        ctx.RouterLogits.Add(logits);
        var routed = _experts switch
        {
            FusedExperts f => f.Forward(flat, topIdx, topW),
            ClampedFusedExperts c => c.Forward(flat, topIdx, topW),
            _ => throw new InvalidOperationException(),
        };
        if (_o.RoutedScale != 1.0) routed = routed * _o.RoutedScale;
        if (_shared is not null)
        {
            var sh = _shared is GatedMlp g ? g.Forward(flat) : ((FusedGateUpMlp)_shared).Forward(flat);
            routed = _o.SharedAverage ? (routed + sh) / 2 : routed + sh;
        }
        return routed.view(shape);
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

/// <summary>MiniMax-M3's clamped SwiGLU on (gate, up): <c>g·sigmoid(α g)·(clamp(up, ±L) + 1)</c>, g = clamp(gate, max = L).</summary>
internal static class ClampedSwiglu
{
    public static Tensor Apply(Tensor gateUp, double limit, double alpha)
    {
        var gu = gateUp.chunk(2, -1);
        var gate = gu[0].clamp_max(limit);
        var up = gu[1].clamp(-limit, limit);
        return (up + 1.0) * (gate * nn.functional.sigmoid(gate * alpha));
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

/// <summary>transformers-5 fused experts (<c>gate_up_proj [E, 2I, H]</c>, <c>down_proj [E, H, I]</c>) with the clamped SwiGLU (MiniMax-M3).</summary>
public sealed class ClampedFusedExperts : ExpertsBase
{
    readonly double _limit, _alpha;
    public override bool IsTransposed => false;

    public ClampedFusedExperts(long experts, long hidden, long intermediate, double limit, double alpha, Init init)
    {
        NumExperts = experts; _limit = limit; _alpha = alpha;
        AddParameter("gate_up_proj", init.Normal(experts, 2 * intermediate, hidden));
        AddParameter("down_proj", init.Normal(experts, hidden, intermediate));
    }

    public Tensor Forward(Tensor x, Tensor topIdx, Tensor topW)
    {
        if (Dispatching == ExpertDispatch.Loop)
        {
            var gateUp = Effective("gate_up_proj");
            var down = Effective("down_proj");
            var final = zeros_like(x);
            foreach (var (e, tok, slot) in Dispatch(topIdx, NumExperts))
            {
                var h = nn.functional.linear(ClampedSwiglu.Apply(nn.functional.linear(x.index_select(0, tok), gateUp[e]), _limit, _alpha), down[e]);
                var w = topW.index(TensorIndex.Tensor(tok), TensorIndex.Tensor(slot)).unsqueeze(-1);
                final = final.index_add(0, tok, (h * w).to(final.dtype), 1.0);
            }
            return final;
        }
        var g = Group(topIdx);
        var y = RunExperts(g, x.index_select(0, g.TokenOf), (ops, xe) =>
            ops.Mm(ClampedSwiglu.Apply(ops.Mm(xe, "gate_up_proj", transposeWeight: true), _limit, _alpha), "down_proj", transposeWeight: true));
        var wt = topW.flatten().index_select(0, g.Order).unsqueeze(-1);
        return zeros_like(x).index_add(0, g.TokenOf, (y * wt).to(x.dtype), 1.0);
    }
}
