using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// The softmax-then-top-k sparse MoE block (<see cref="SoftmaxTopKRouterSettings"/>: Mixtral, Qwen2-MoE, Qwen3-MoE,
/// OLMoE in transformers 5): probs = softmax(fp32 logits); top-k; optionally renormalise; cast to the hidden dtype;
/// fused experts. A shared expert with a sigmoid gate (Qwen2-MoE) adds <c>sigmoid(shared_expert_gate(x)) * shared_expert(x)</c>.
/// </summary>
public sealed class SoftmaxTopKMoe : HfModule, IBlock
{
    public RouterWeight gate { get; }
    public FusedExperts experts { get; }
    public GatedMlp? shared_expert { get; }
    public Linear? shared_expert_gate { get; }
    readonly long _topK;
    readonly bool _normTopK;

    public SoftmaxTopKMoe(long hidden, MoeSettings s, Init init)
    {
        var router = (SoftmaxTopKRouterSettings)s.Router;
        _topK = router.TopK; _normTopK = router.NormTopK;
        var g = new RouterWeight(router.NumExperts, hidden, init);
        var e = new FusedExperts(s.Experts.NumExperts, hidden, s.Experts.Intermediate, s.Experts.Act, init);
        if (s.Order == MoeOrder.ExpertsFirst) { experts = AddChild("experts", e); gate = AddChild(router.Name, g); }
        else { gate = AddChild(router.Name, g); experts = AddChild("experts", e); }
        if (s.Shared is { } shared)
        {
            if (shared.SigmoidGateName is null) throw new NotSupportedException("a softmax top-k MoE block with an ungated shared expert has no runtime block yet.");
            shared_expert = AddChild(shared.Name, new GatedMlp(hidden, shared.Intermediate, shared.Act, init, shared.Bias, shared.ActName));
            shared_expert_gate = AddChild(shared.SigmoidGateName, new Linear(hidden, 1, false, init));
        }
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var shape = x.shape;
        var flat = x.reshape(-1, shape[^1]);
        var logits = gate.Logits(flat);
        ctx.RouterLogits.Add(logits);
        var probs = logits.softmax(-1, ScalarType.Float32);
        var (topW, topIdx) = probs.topk((int)_topK, -1);
        if (_normTopK) topW = topW / topW.sum(-1, keepdim: true);
        topW = topW.to(x.dtype);
        var y = experts.Forward(flat, topIdx, topW);
        if (shared_expert is not null)
            y = y + nn.functional.sigmoid(shared_expert_gate!.Forward(flat)) * shared_expert.Forward(flat);
        return y.view(shape);
    }
}
