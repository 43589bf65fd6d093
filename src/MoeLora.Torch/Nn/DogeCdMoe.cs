using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// Doge's <c>DogeCDMoE</c> (<see cref="ProductKeyMoeSettings"/>): a gated MLP every token runs (the shared expert) plus
/// <c>num_experts</c> single-neuron "retrieval" experts, rows of the <c>down_embed</c> / <c>up_embed</c> embeddings,
/// chosen by product keys (<see cref="ProductKeyTopK"/>). Registered act_fn, gate_proj, up_proj, down_proj,
/// router_gate, down_embed, up_embed, as transformers assigns them.
/// </summary>
public sealed class DogeCdMoe : HfModule, IBlock, IRoutedExperts
{
    public Linear gate_proj { get; }
    public Linear up_proj { get; }
    public Linear down_proj { get; }
    public Linear router_gate { get; }
    readonly Embedding _downEmbed, _upEmbed;
    readonly Activation _act;
    readonly ProductKeyMoeSettings _s;

    public long NumExperts => _s.NumExperts;
    public long[]? LastSelectedCounts { get; private set; }
    public bool SharesRouting => false;

    public DogeCdMoe(long hidden, ProductKeyMoeSettings s, Init init)
    {
        _s = s;
        _act = AddChild("act_fn", new Activation(s.Act));
        gate_proj = AddChild("gate_proj", new Linear(hidden, s.Intermediate, s.Bias, init));
        up_proj = AddChild("up_proj", new Linear(hidden, s.Intermediate, s.Bias, init));
        down_proj = AddChild("down_proj", new Linear(s.Intermediate, hidden, s.Bias, init));
        router_gate = AddChild("router_gate", new Linear(hidden, 2 * s.NumKeys, false, init));
        _downEmbed = AddChild("down_embed", new Embedding(s.NumExperts, hidden, init));
        _upEmbed = AddChild("up_embed", new Embedding(s.NumExperts, hidden, init));
    }

    /// <summary>Mirrors <c>DogeCDMoE.forward</c>, including how it splits the router logits (see the comment below).</summary>
    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1], t = b * s;
        // transformers views the [B, S, 2K] logits as [2, B·S, K]: a reinterpretation of memory, not a split of each
        // token's 2K logits into halves. Row r of the first "half" holds the logits r·K .. r·K+K-1 of the flat tensor
        // (token r/2), row r of the second those of token (B·S + r)/2, so a token's experts are chosen from other tokens'
        // logits, across the rows of the batch. Checkpoints were trained with this routing, so it is kept as written.
        var logits = router_gate.Forward(x).view(2, t, -1);
        ctx.RouterLogits.Add(logits);
        var (scores, indices) = ProductKeyTopK(logits[0], logits[1], _s.TopK);
        var weights = scores.softmax(-1);
        if (_s.NormTopK) weights = weights / weights.sum(-1, keepdim: true);
        using (no_grad()) LastSelectedCounts = indices.flatten().bincount(null, _s.NumExperts).cpu().data<long>().ToArray();

        var down = _downEmbed.Forward(indices);                                       // [T, k, H]
        var up = _upEmbed.Forward(indices);
        var neuron = matmul(down, x.view(t, -1, 1)).view(t, -1);                      // down_embed[e] · x
        var routed = matmul((_act.Forward(neuron) * weights).view(t, 1, -1), up).view(b, s, -1);
        return down_proj.Forward(_act.Forward(gate_proj.Forward(x)) * up_proj.Forward(x)) + routed;
    }

    /// <summary>
    /// Product-key top-k: each half sorted (topk over all K), the K² sums of one key from each, top-k of those; expert
    /// i·K + j for keys i and j. Returns the k scores (descending) and experts, as <c>DogeCDMoE.forward</c> computes them.
    /// </summary>
    /// <param name="first">[T, K] logits of the first keys.</param><param name="second">[T, K] logits of the second keys.</param>
    public static (Tensor Scores, Tensor Experts) ProductKeyTopK(Tensor first, Tensor second, long topK)
    {
        int keys = (int)first.shape[^1];
        var (sx, ix) = first.topk(keys, -1);
        var (sy, iy) = second.topk(keys, -1);
        var all = (sx.unsqueeze(-1) + sy.unsqueeze(-2)).flatten(-2);
        var experts = (ix.unsqueeze(-1) * keys + iy.unsqueeze(-2)).flatten(-2);
        var (scores, at) = all.topk((int)topK, -1);
        return (scores, experts.gather(-1, at));
    }
}
