using MoeLora.Torch.Nn;

namespace MoeLora.Torch.Models.Families;

/// <summary>
/// mistral (dense): the Llama layout without biases; every layer attends within <c>sliding_window</c> tokens when the
/// config sets one (Mistral 7B v0.1), else to the full causal past (v0.2+, Nemo).
/// </summary>
internal sealed class Mistral : IModelFamily
{
    public string ModelType => "mistral";

    public CausalLm Build(ModelConfig c, Init init)
    {
        var window = c.LongOrNull("sliding_window");
        var rope = Rotary.FromConfig(c, c.HeadDim);
        var (kind, size) = window is long w ? (MaskKind.Sliding, w) : (MaskKind.Full, 0L);
        return new CausalLm(c, init, i => new DecoderLayer(
            new StandardAttention(c, new(false, false, QkNorm.None, false, kind, size), init, ctx => rope.CosSin(ctx.Positions, ctx.DType)),
            "mlp", new GatedMlp(c.HiddenSize, c.Long("intermediate_size"), c.HiddenAct, init),
            new RmsNorm(c.HiddenSize, c.RmsEps, init), new RmsNorm(c.HiddenSize, c.RmsEps, init)),
            new RmsNorm(c.HiddenSize, c.RmsEps, init));
    }
}
