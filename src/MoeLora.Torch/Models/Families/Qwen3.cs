using MoeLora.Torch.Nn;

namespace MoeLora.Torch.Models.Families;

/// <summary>qwen3 (dense): Llama layout plus per-head q_norm/k_norm before rope.</summary>
internal sealed class Qwen3 : IModelFamily
{
    public string ModelType => "qwen3";

    public CausalLm Build(ModelConfig c, Init init)
    {
        if (c.BoolOr("use_sliding_window", false))
            throw new NotSupportedException("qwen3 with use_sliding_window=true is not supported yet.");
        var rope = Rotary.FromConfig(c, c.HeadDim);
        var bias = c.BoolOr("attention_bias", false);
        return new CausalLm(c, init, i => new DecoderLayer(
            new StandardAttention(c, new(bias, bias, QkNorm.PerHead, false, MaskKind.Full, 0), init, ctx => rope.CosSin(ctx.Positions, ctx.DType)),
            "mlp", new GatedMlp(c.HiddenSize, c.Long("intermediate_size"), c.HiddenAct, init),
            new RmsNorm(c.HiddenSize, c.RmsEps, init), new RmsNorm(c.HiddenSize, c.RmsEps, init)),
            new RmsNorm(c.HiddenSize, c.RmsEps, init));
    }
}
