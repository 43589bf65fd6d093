using MoeLora.Torch.Nn;

namespace MoeLora.Torch.Models.Families;

/// <summary>
/// mistral (dense): the Llama layout without biases. Only full attention (sliding_window null, as Mistral v0.2+ and
/// Nemo ship); a sliding window is refused rather than computed unchecked.
/// </summary>
internal sealed class Mistral : IModelFamily
{
    public string ModelType => "mistral";

    public CausalLm Build(ModelConfig c, Init init)
    {
        if (c.LongOrNull("sliding_window") is not null)
            throw new NotSupportedException("mistral with a sliding_window is not supported yet (sliding_window null is).");
        var rope = Rotary.FromConfig(c, c.HeadDim);
        return new CausalLm(c, init, i => new DecoderLayer(
            new StandardAttention(c, new(false, false, QkNorm.None, false, MaskKind.Full, 0), init, ctx => rope.CosSin(ctx.Positions, ctx.DType)),
            "mlp", new GatedMlp(c.HiddenSize, c.Long("intermediate_size"), c.HiddenAct, init),
            new RmsNorm(c.HiddenSize, c.RmsEps, init), new RmsNorm(c.HiddenSize, c.RmsEps, init)),
            new RmsNorm(c.HiddenSize, c.RmsEps, init));
    }
}
