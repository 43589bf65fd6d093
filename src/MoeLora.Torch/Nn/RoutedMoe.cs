using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// A sparse MoE block whose router is one of <see cref="SoftmaxStaticsTopKRouterSettings"/> (ERNIE 4.5),
/// <see cref="LinearSoftmaxTopKRouterSettings"/> (HunYuan) or <see cref="SigmoidBlockBiasTopKRouterSettings"/>
/// (HY V3): the router gives (logits, top-k weights, top-k experts), transformers-v5 fused experts run them, and an
/// optional ungated shared expert is added (in fp32 when <see cref="MoeSettings.SumInFp32"/>).
/// </summary>
public sealed class RoutedMoe : HfModule, IBlock
{
    readonly HfModule _router;
    readonly FusedExperts _experts;
    readonly GatedMlp? _shared;
    readonly Tensor? _blockBias;
    readonly RouterSettings _r;
    readonly bool _sumInFp32;

    public RoutedMoe(long hidden, MoeSettings s, Init init)
    {
        _r = s.Router;
        _sumInFp32 = s.SumInFp32;
        // Routers transformers keeps in fp32 whatever the model dtype (ERNIE: _keep_in_fp32_modules_strict; HunYuan:
        // its gate Linear is created with dtype=torch.float32).
        var fp32 = init with { DType = ScalarType.Float32 };
        HfModule router = _r switch
        {
            SoftmaxStaticsTopKRouterSettings r => new StaticsTopKRouter(r.NumExperts, hidden, fp32),
            LinearSoftmaxTopKRouterSettings r => new LinearRouter(r.LinearName, r.NumExperts, hidden, fp32),
            SigmoidBlockBiasTopKRouterSettings r => new RouterWeight(r.NumExperts, hidden, init),
            _ => throw new NotSupportedException($"router settings {_r.GetType().Name} have no RoutedMoe router."),
        };
        var experts = new FusedExperts(s.Experts.NumExperts, hidden, s.Experts.Intermediate, s.Experts.Act, init);
        if (s.Order == MoeOrder.ExpertsFirst) { _experts = AddChild("experts", experts); _router = AddChild(_r.Name, router); }
        else { _router = AddChild(_r.Name, router); _experts = AddChild("experts", experts); }
        if (_r is SigmoidBlockBiasTopKRouterSettings b)
            _blockBias = AddBuffer(b.BiasName, zeros(b.NumExperts, ScalarType.Float32, init.Device));
        if (s.Shared is { } shared)
        {
            if (shared.SigmoidGateName is not null) throw new NotSupportedException($"a gated shared expert with {_r.GetType().Name} has no runtime block yet.");
            _shared = AddChild(shared.Name, new GatedMlp(hidden, shared.Intermediate, shared.Act, init, shared.Bias, shared.ActName));
        }
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var shape = x.shape;
        var flat = x.reshape(-1, shape[^1]);
        var (logits, topW, topIdx) = Route(flat);
        ctx.RouterLogits.Add(logits);
        var y = _experts.Forward(flat, topIdx, topW);
        if (_shared is not null)
        {
            var sh = _shared.Forward(flat);
            y = _sumInFp32 ? (y.to(ScalarType.Float32) + sh.to(ScalarType.Float32)).to(x.dtype) : y + sh;
        }
        return y.view(shape);
    }

    (Tensor Logits, Tensor Weights, Tensor Experts) Route(Tensor flat)
    {
        int k = (int)_r.TopK;
        switch (_router)
        {
            case StaticsTopKRouter g:
            {
                // ERNIE: softmax in fp32, selection on softmax + statics bias, renormalised with a clamped sum.
                var logits = nn.functional.linear(flat.to(ScalarType.Float32), g.EffectiveWeight().to(ScalarType.Float32));
                var probs = logits.softmax(1, ScalarType.Float32);
                Tensor idx;
                using (no_grad()) idx = (probs + g.moe_statics.e_score_correction_bias.squeeze().to(ScalarType.Float32)).topk(k, -1).indexes;
                var w = probs.gather(-1, idx);
                w = w / w.sum(-1, keepdim: true).clamp_min(((SoftmaxStaticsTopKRouterSettings)_r).NormMin);
                return (logits, w.to(flat.dtype), idx);
            }
            case LinearRouter g:
            {
                // HunYuan: the gate Linear's dtype decides the input dtype (fp32 as built); softmax, top-k, renormalised.
                var logits = g.wg.Forward(flat.to(g.wg.weight.dtype));
                var (w, idx) = logits.softmax(1, ScalarType.Float32).topk(k, -1);
                w = w / w.sum(-1, keepdim: true);
                return (logits, w.to(logits.dtype), idx);
            }
            case RouterWeight g:
            {
                // HY V3: sigmoid scores; selection on scores + the block's bias; renormalised (+1e-20), scaled.
                var r = (SigmoidBlockBiasTopKRouterSettings)_r;
                var logits = nn.functional.linear(flat.to(ScalarType.Float32), g.EffectiveWeight().to(ScalarType.Float32));
                var scores = logits.sigmoid();
                Tensor idx;
                using (no_grad()) idx = (scores + _blockBias!).topk(k, -1, sorted: false).indexes;
                var w = scores.gather(1, idx);
                w = w / (w.sum(-1, keepdim: true) + 1e-20) * r.ScalingFactor;
                return (logits, w, idx);
            }
            default:
                throw new NotSupportedException($"{_router.GetType().Name} is not a RoutedMoe router.");
        }
    }
}

/// <summary>ERNIE 4.5's router module: <c>weight [E, H]</c> and <c>moe_statics.e_score_correction_bias [1, E]</c>, both fp32.</summary>
public sealed class StaticsTopKRouter : HfModule
{
    public Parameter weight { get; }
    public MoeStatics moe_statics { get; }
    readonly List<IParamDelta> _deltas = [];
    internal void AttachDelta(IParamDelta d) => _deltas.Add(d);
    public Tensor EffectiveWeight() => ParamDeltas.Apply(weight, _deltas);

    public StaticsTopKRouter(long experts, long hidden, Init init)
    {
        weight = AddParameter("weight", init.Normal(experts, hidden));
        moe_statics = AddChild("moe_statics", new MoeStatics(experts, init));
    }
}

/// <summary>ERNIE 4.5's <c>Ernie4_5_MoeStatics</c>: a frozen parameter <c>e_score_correction_bias [1, E]</c>.</summary>
public sealed class MoeStatics : HfModule
{
    public Parameter e_score_correction_bias { get; }
    public MoeStatics(long experts, Init init) => e_score_correction_bias = AddParameter("e_score_correction_bias", init.Zeros(1, experts));
}

/// <summary>HunYuan's gate module: an nn.Linear (no bias) router named <paramref name="linearName"/>.</summary>
public sealed class LinearRouter : HfModule
{
    public Linear wg { get; }
    public LinearRouter(string linearName, long experts, long hidden, Init init) => wg = AddChild(linearName, new Linear(hidden, experts, false, init));
}
