using MoeLora.Torch.Nn;

namespace MoeLora.Torch.Models.Families;

/// <summary>
/// qwen2_moe: q/k/v bias (<c>qkv_bias</c>), o without; MoE unless the layer is in <c>mlp_only_layers</c> or off the
/// <c>decoder_sparse_step</c> grid; shared expert gated by <c>sigmoid(shared_expert_gate(x))</c>.
/// </summary>
internal sealed class Qwen2Moe : IModelFamily
{
    public string ModelType => "qwen2_moe";

    public CausalLm Build(ModelConfig c, Init init)
    {
        if (c.BoolOr("use_sliding_window", false))
            throw new NotSupportedException("qwen2_moe with use_sliding_window=true is not supported yet.");
        var rope = Rotary.FromConfig(c, c.HeadDim);
        var qkvBias = c.BoolOr("qkv_bias", true);
        long experts = c.Long("num_experts"), step = c.LongOr("decoder_sparse_step", 1);
        var mlpOnly = c.LongArrayOr("mlp_only_layers", []);
        var moe = new SoftmaxTopKMoe.Options(experts, c.Long("num_experts_per_tok"), c.Long("moe_intermediate_size"),
            c.BoolOr("norm_topk_prob", false), ExpertsBeforeGate: false, c.Long("shared_expert_intermediate_size"));
        return new CausalLm(c, init, i =>
        {
            bool sparse = !mlpOnly.Contains(i) && experts > 0 && (i + 1) % step == 0;
            HfModule ff = sparse ? new SoftmaxTopKMoe(c, moe, init) : new GatedMlp(c.HiddenSize, c.Long("intermediate_size"), c.HiddenAct, init);
            return new DecoderLayer(
                new StandardAttention(c, new(qkvBias, false, QkNorm.None, false, MaskKind.Full, 0), init, ctx => rope.CosSin(ctx.Positions, ctx.DType)),
                "mlp", ff, new RmsNorm(c.HiddenSize, c.RmsEps, init), new RmsNorm(c.HiddenSize, c.RmsEps, init));
        }, new RmsNorm(c.HiddenSize, c.RmsEps, init));
    }
}
