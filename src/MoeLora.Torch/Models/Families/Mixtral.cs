using MoeLora.Torch.Nn;

namespace MoeLora.Torch.Models.Families;

/// <summary>
/// mixtral: all layers MoE; router softmax → top-k → always renormalised; no attention bias;
/// sliding-window mask when <c>sliding_window</c> is set. Hub checkpoints use <c>block_sparse_moe.experts.{e}.w1/w2/w3</c>.
/// </summary>
internal sealed class Mixtral : IModelFamily
{
    public string ModelType => "mixtral";

    public CausalLm Build(ModelConfig c, Init init)
    {
        var rope = Rotary.FromConfig(c, c.HeadDim);
        long window = c.LongOrNull("sliding_window") ?? 0;
        var attn = new StandardAttention.Options(false, false, QkNorm.None, false, window > 0 ? MaskKind.Sliding : MaskKind.Full, window);
        var moe = new SoftmaxTopKMoe.Options(c.Long("num_local_experts"), c.Long("num_experts_per_tok"), c.Long("intermediate_size"),
            NormTopK: true, ExpertsBeforeGate: false, SharedIntermediate: 0);
        return new CausalLm(c, init, i => new DecoderLayer(
            new StandardAttention(c, attn, init, ctx => rope.CosSin(ctx.Positions, ctx.DType)),
            "mlp", new SoftmaxTopKMoe(c, moe, init),
            new RmsNorm(c.HiddenSize, c.RmsEps, init), new RmsNorm(c.HiddenSize, c.RmsEps, init)),
            new RmsNorm(c.HiddenSize, c.RmsEps, init));
    }

    public IEnumerable<(string From, string To)> HubRenames => [(".block_sparse_moe.", ".mlp.")];
}
