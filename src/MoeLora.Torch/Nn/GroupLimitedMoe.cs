using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// DeepSeek-V3's TopkRouter (also GLM-4.5's): <c>weight [E, H]</c> plus the persistent buffer
/// <c>e_score_correction_bias</c> (in the state dict, not a parameter).
/// </summary>
public sealed class GroupLimitedRouter : HfModule
{
    public Parameter weight { get; }
    public Tensor e_score_correction_bias { get; }
    readonly List<IParamDelta> _deltas = [];
    internal void AttachDelta(IParamDelta d) => _deltas.Add(d);
    public Tensor EffectiveWeight() => ParamDeltas.Apply(weight, _deltas);
    public GroupLimitedRouter(long experts, long hidden, Init init)
    {
        weight = AddParameter("weight", init.Normal(experts, hidden));
        e_score_correction_bias = AddBuffer("e_score_correction_bias", zeros(experts, ScalarType.Float32, init.Device));
    }
}

/// <summary>
/// What the group-limited MoE blocks share: fused experts and the router module registered in the family's order, then
/// the shared experts; forward = router logits (recorded) → the block's selection → fused experts, plus the shared
/// experts always added. Subclasses say how the logits are computed and how experts are selected.
/// </summary>
public abstract class GroupLimitedMoeBlock<TGate> : HfModule, IBlock where TGate : HfModule
{
    readonly ExpertsBase _experts;
    readonly GatedMlp? _shared;
    readonly INorm? _outputNorm;
    protected TGate Gate { get; }

    /// <param name="routerKind">Names the router in the refusal of a gated shared expert.</param>
    protected GroupLimitedMoeBlock(long hidden, MoeSettings s, Init init, TGate gate, string routerKind)
    {
        // Plain fused experts, or HY-V4's clamped SwiGLU ones.
        ExpertsBase experts = s.Experts.Layout == ExpertsLayout.GateUpOutInClamped
            ? new ClampedFusedExperts(s.Experts.NumExperts, hidden, s.Experts.Intermediate, s.Experts.SwigluLimit, s.Experts.SwigluAlpha, init, s.Experts.SwigluUpShift,
                s.Experts.ClampAfterActivation)
            : new FusedExperts(s.Experts.NumExperts, hidden, s.Experts.Intermediate, s.Experts.Act, init);
        if (s.Order == MoeOrder.ExpertsFirst) { _experts = AddChild("experts", experts); Gate = AddChild(s.Router.Name, gate); }
        else { Gate = AddChild(s.Router.Name, gate); _experts = AddChild("experts", experts); }
        if (s.Shared is { } shared)
        {
            if (shared.SigmoidGateName is not null) throw new NotSupportedException($"a gated shared expert with a {routerKind} router has no runtime block yet.");
            _shared = AddChild(shared.Name, new GatedMlp(hidden, shared.Intermediate, shared.Act, init, shared.Bias, shared.ActName));
        }
        // The only option these blocks take: A.X-K1's output norm, registered after the shared experts.
        if (s.Options is { } o)
        {
            if (o with { OutputNorm = null } != new MoeOptions())
                throw new NotSupportedException($"a {routerKind} MoE block takes no option but an output norm.");
            if (o.OutputNorm is { } n) _outputNorm = (INorm)AddChild(n.Name, Norms.Create(hidden, n.Norm, init));
        }
    }

    /// <summary>Router logits [T, E] of the flattened tokens.</summary>
    protected abstract Tensor Logits(Tensor flat);

    /// <summary>The chosen experts [T, k] and their weights [T, k].</summary>
    protected abstract (Tensor Idx, Tensor W) Select(Tensor logits);

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var shape = x.shape;
        var flat = x.reshape(-1, shape[^1]);
        var logits = Logits(flat);
        ctx.RouterLogits.Add(logits);
        var (topIdx, topW) = Select(logits);
        var routed = (_experts is ClampedFusedExperts c ? c.Forward(flat, topIdx, topW) : ((FusedExperts)_experts).Forward(flat, topIdx, topW)).to(x.dtype);
        var y = (_shared is null ? routed : routed + _shared.Forward(flat)).view(shape);
        return _outputNorm is null ? y : _outputNorm.Forward(y);
    }
}

/// <summary>
/// The MoE block of <see cref="SigmoidGroupLimitedRouterSettings"/>: fp32 logits, sigmoid scores, group-limited
/// top-k on scores + e_score_correction_bias, weights from the uncorrected scores, optional renormalisation (+1e-20),
/// times routed_scaling_factor; fused experts, then the shared experts always added.
/// </summary>
public sealed class SigmoidGroupLimitedMoe(long hidden, MoeSettings s, Init init)
    : GroupLimitedMoeBlock<GroupLimitedRouter>(hidden, s, init, new GroupLimitedRouter(s.Router.NumExperts, hidden, init), "group-limited")
{
    readonly SigmoidGroupLimitedRouterSettings _r = (SigmoidGroupLimitedRouterSettings)s.Router;

    protected override Tensor Logits(Tensor flat) =>
        nn.functional.linear(flat.to(ScalarType.Float32), Gate.EffectiveWeight().to(ScalarType.Float32));

    protected override (Tensor Idx, Tensor W) Select(Tensor logits) => Route(logits, Gate.e_score_correction_bias, _r);

    /// <summary>
    /// DeepSeek-V3's selection on fp32 router logits [T, E]: sigmoid scores; experts chosen (without gradient) on
    /// scores + <paramref name="correctionBias"/> within the best TopKGroups groups (a group scored by its two best; the
    /// other groups' experts score OtherGroupsScore, -inf or A.X-K2's 0);
    /// weights gathered from the uncorrected scores, optionally renormalised (+1e-20), times routed_scaling_factor.
    /// Shared by the blocks of this router (DeepSeek-V3's experts, Nemotron-H's non-gated ones).
    /// </summary>
    internal static (Tensor Idx, Tensor W) Route(Tensor logits, Tensor correctionBias, SigmoidGroupLimitedRouterSettings r)
    {
        long e = r.NumExperts, groups = r.Groups, per = e / groups;
        var scores = logits.sigmoid();
        Tensor topIdx;
        using (no_grad())
        {
            var choice = scores.view(-1, e) + correctionBias.unsqueeze(0);
            var groupScores = choice.view(-1, groups, per).topk(Math.Min(2, (int)per), -1).values.sum(-1);
            var groupIdx = groupScores.topk((int)r.TopKGroups, -1, sorted: false).indexes;
            var groupMask = zeros_like(groupScores).scatter(1, groupIdx, ones_like(groupIdx, groupScores.dtype));
            var scoreMask = groupMask.unsqueeze(-1).expand(-1, groups, per).reshape(-1, e);
            choice = choice.masked_fill(scoreMask.logical_not(), r.OtherGroupsScore);
            topIdx = choice.topk((int)r.TopK, -1, sorted: false).indexes;
        }
        var topW = scores.gather(1, topIdx);
        if (r.NormTopK) topW = topW / (topW.sum(-1, keepdim: true) + 1e-20);
        return (topIdx, topW * r.RoutedScalingFactor);
    }
}

/// <summary>
/// The MoE block of <see cref="SoftmaxGroupLimitedRouterSettings"/> (DeepSeek-V2, Mistral 4), registered experts,
/// gate (<c>weight [E, H]</c>, no correction bias), shared_experts: softmax scores, group-limited top-k with the other
/// groups' scores zeroed, weights times routed_scaling_factor; the shared experts always added.
/// </summary>
public sealed class SoftmaxGroupLimitedMoe(long hidden, MoeSettings s, Init init)
    : GroupLimitedMoeBlock<RouterWeight>(hidden, s, init, new RouterWeight(s.Router.NumExperts, hidden, init), "softmax group-limited")
{
    readonly SoftmaxGroupLimitedRouterSettings _r = (SoftmaxGroupLimitedRouterSettings)s.Router;

    // DeepSeek-V2: F.linear on fp32 copies of input and weight; Mistral 4: in the model's dtype.
    protected override Tensor Logits(Tensor flat) => _r.InFp32
        ? nn.functional.linear(flat.to(ScalarType.Float32), Gate.EffectiveWeight().to(ScalarType.Float32))
        : Gate.Logits(flat);

    protected override (Tensor Idx, Tensor W) Select(Tensor logits) => Route(logits, _r);

    /// <summary>
    /// Selection on router logits [T, E] (softmax in fp32 when <see cref="SoftmaxGroupLimitedRouterSettings.InFp32"/>,
    /// else in the logits' dtype): groups scored by their best score or best two, the best TopKGroups kept, the other
    /// experts' scores set to 0; the top-k of those. Weights: the top-k values themselves (DeepSeek-V2) or the unmasked
    /// scores gathered (Mistral 4), optionally renormalised (+1e-20), times routed_scaling_factor.
    /// </summary>
    internal static (Tensor Idx, Tensor W) Route(Tensor logits, SoftmaxGroupLimitedRouterSettings r)
    {
        long e = r.NumExperts, groups = r.Groups, per = e / groups;
        var scores = r.InFp32 ? logits.softmax(-1, ScalarType.Float32) : logits.softmax(-1);
        var masked = scores;
        if (groups > 1)
        {
            Tensor scoreMask;
            using (no_grad())
            {
                var grouped = scores.view(-1, groups, per);
                var groupScores = r.Score == GroupScore.Max ? grouped.max(-1).values : grouped.topk(2, -1).values.sum(-1);
                var groupIdx = groupScores.topk((int)r.TopKGroups, -1, sorted: false).indexes;
                var groupMask = zeros_like(groupScores).scatter(1, groupIdx, ones_like(groupIdx, groupScores.dtype));
                scoreMask = groupMask.unsqueeze(-1).expand(-1, groups, per).reshape(-1, e);
            }
            masked = scores.masked_fill(scoreMask.logical_not(), 0.0);
        }
        var (values, topIdx) = masked.topk((int)r.TopK, -1, sorted: false);
        var topW = r.WeightsFromScores ? scores.gather(1, topIdx) : values;
        if (r.NormTopK) topW = topW / (topW.sum(-1, keepdim: true) + 1e-20);
        return (topIdx, topW * r.RoutedScalingFactor);
    }
}
