using MoeLora.Torch.Nn;

namespace MoeLora.Torch.Models.Families;

/// <summary>llama (LlamaForCausalLM): GQA attention (attention_bias), gated MLP (mlp_bias), default/yarn rope.</summary>
internal sealed class Llama : IModelFamily
{
    public string ModelType => "llama";

    public CausalLm Build(ModelConfig c, Init init)
    {
        var rope = Rotary.FromConfig(c, c.HeadDim);
        var bias = c.BoolOr("attention_bias", false);
        return new CausalLm(c, init, i => new DecoderLayer(
            new StandardAttention(c, new(bias, bias, QkNorm.None, false, MaskKind.Full, 0), init, ctx => rope.CosSin(ctx.Positions, ctx.DType)),
            "mlp", new GatedMlp(c.HiddenSize, c.Long("intermediate_size"), c.HiddenAct, init, c.BoolOr("mlp_bias", false)),
            new RmsNorm(c.HiddenSize, c.RmsEps, init), new RmsNorm(c.HiddenSize, c.RmsEps, init)),
            new RmsNorm(c.HiddenSize, c.RmsEps, init));
    }
}
