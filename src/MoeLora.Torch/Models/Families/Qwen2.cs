using MoeLora.Torch.Nn;

namespace MoeLora.Torch.Models.Families;

/// <summary>qwen2 (dense): the Llama layout with q/k/v biases and no o_proj bias (hard-coded in transformers).</summary>
internal sealed class Qwen2 : IModelFamily
{
    public string ModelType => "qwen2";

    public CausalLm Build(ModelConfig c, Init init)
    {
        if (c.BoolOr("use_sliding_window", false))
            throw new NotSupportedException("qwen2 with use_sliding_window=true is not supported yet.");
        var rope = Rotary.FromConfig(c, c.HeadDim);
        return new CausalLm(c, init, i => new DecoderLayer(
            new StandardAttention(c, new(true, false, QkNorm.None, false, MaskKind.Full, 0), init, ctx => rope.CosSin(ctx.Positions, ctx.DType)),
            "mlp", new GatedMlp(c.HiddenSize, c.Long("intermediate_size"), c.HiddenAct, init),
            new RmsNorm(c.HiddenSize, c.RmsEps, init), new RmsNorm(c.HiddenSize, c.RmsEps, init)),
            new RmsNorm(c.HiddenSize, c.RmsEps, init));
    }
}
