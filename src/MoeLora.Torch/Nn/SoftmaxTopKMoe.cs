using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// The softmax-then-top-k sparse MoE block shared by Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE (transformers v5):
/// probs = softmax(fp32 logits); top-k; optionally renormalise; cast to the hidden dtype; fused experts.
/// Qwen2-MoE adds <c>sigmoid(shared_expert_gate(x)) * shared_expert(x)</c>.
/// </summary>
public sealed class SoftmaxTopKMoe : HfModule, IBlock
{
    public RouterWeight gate { get; }
    public FusedExperts experts { get; }
    public GatedMlp? shared_expert { get; }
    public Linear? shared_expert_gate { get; }
    readonly long _topK;
    readonly bool _normTopK;

    public sealed record Options(long Experts, long TopK, long Intermediate, bool NormTopK, bool ExpertsBeforeGate, long SharedIntermediate);

    public SoftmaxTopKMoe(Models.ModelConfig c, Options o, Init init)
    {
        _topK = o.TopK; _normTopK = o.NormTopK;
        var g = new RouterWeight(o.Experts, c.HiddenSize, init);
        var e = new FusedExperts(o.Experts, c.HiddenSize, o.Intermediate, c.HiddenAct, init);
        // Registration order is the transformers order: qwen3_moe registers experts first, the others the gate.
        if (o.ExpertsBeforeGate) { experts = AddChild("experts", e); gate = AddChild("gate", g); }
        else { gate = AddChild("gate", g); experts = AddChild("experts", e); }
        if (o.SharedIntermediate > 0)
        {
            shared_expert = AddChild("shared_expert", new GatedMlp(c.HiddenSize, o.SharedIntermediate, c.HiddenAct, init));
            shared_expert_gate = AddChild("shared_expert_gate", new Linear(c.HiddenSize, 1, false, init));
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
