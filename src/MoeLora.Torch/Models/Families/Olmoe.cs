using MoeLora.Torch.Nn;

namespace MoeLora.Torch.Models.Families;

/// <summary>olmoe: all layers MoE; q_norm/k_norm over the whole q/k projections (before the head split); norm_topk_prob.</summary>
internal sealed class Olmoe : IModelFamily
{
    public string ModelType => "olmoe";

    public CausalLm Build(ModelConfig c, Init init)
    {
        if (c.Has("clip_qkv") && c.LongOrNull("clip_qkv") is not null)
            throw new NotSupportedException("olmoe with clip_qkv is not supported yet.");
        var rope = Rotary.FromConfig(c, c.HeadDim);
        var bias = c.BoolOr("attention_bias", false);
        var moe = new SoftmaxTopKMoe.Options(c.Long("num_experts"), c.Long("num_experts_per_tok"), c.Long("intermediate_size"),
            c.BoolOr("norm_topk_prob", false), ExpertsBeforeGate: false, SharedIntermediate: 0);
        return new CausalLm(c, init, i => new DecoderLayer(
            new StandardAttention(c, new(bias, bias, QkNorm.Full, false, MaskKind.Full, 0), init, ctx => rope.CosSin(ctx.Positions, ctx.DType)),
            "mlp", new SoftmaxTopKMoe(c, moe, init),
            new RmsNorm(c.HiddenSize, c.RmsEps, init), new RmsNorm(c.HiddenSize, c.RmsEps, init)),
            new RmsNorm(c.HiddenSize, c.RmsEps, init));
    }
}
