using MoeLora.Torch.Nn;

namespace MoeLora.Torch.Models.Families;

/// <summary>qwen3_moe: Qwen3 attention (per-head q/k norm); MoE layers by the qwen2_moe rule, no shared expert.</summary>
internal sealed class Qwen3Moe : IModelFamily
{
    public string ModelType => "qwen3_moe";

    public CausalLm Build(ModelConfig c, Init init)
    {
        if (c.BoolOr("use_sliding_window", false))
            throw new NotSupportedException("qwen3_moe with use_sliding_window=true is not supported yet.");
        var rope = Rotary.FromConfig(c, c.HeadDim);
        var bias = c.BoolOr("attention_bias", false);
        long experts = c.Has("num_experts") ? c.Long("num_experts") : c.Long("num_local_experts");
        long step = c.LongOr("decoder_sparse_step", 1);
        var mlpOnly = c.LongArrayOr("mlp_only_layers", []);
        var moe = new SoftmaxTopKMoe.Options(experts, c.Long("num_experts_per_tok"), c.Long("moe_intermediate_size"),
            c.BoolOr("norm_topk_prob", true), ExpertsBeforeGate: true, SharedIntermediate: 0);
        return new CausalLm(c, init, i =>
        {
            bool sparse = !mlpOnly.Contains(i) && experts > 0 && (i + 1) % step == 0;
            HfModule ff = sparse ? new SoftmaxTopKMoe(c, moe, init) : new GatedMlp(c.HiddenSize, c.Long("intermediate_size"), c.HiddenAct, init);
            return new DecoderLayer(
                new StandardAttention(c, new(bias, bias, QkNorm.PerHead, false, MaskKind.Full, 0), init, ctx => rope.CosSin(ctx.Positions, ctx.DType)),
                "mlp", ff, new RmsNorm(c.HiddenSize, c.RmsEps, init), new RmsNorm(c.HiddenSize, c.RmsEps, init));
        }, new RmsNorm(c.HiddenSize, c.RmsEps, init));
    }
}
