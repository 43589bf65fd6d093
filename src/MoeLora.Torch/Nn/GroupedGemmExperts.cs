using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>One grouped-GEMM weight <c>[E, in, out]</c> (Aria's <c>AriaGroupedExpertsGemm</c>): a module, not an nn.Linear.</summary>
public sealed class GroupedGemm : HfModule
{
    public Parameter weight { get; }
    public GroupedGemm(long experts, long inFeatures, long outFeatures, Init init) =>
        weight = AddParameter("weight", init.Normal(experts, inFeatures, outFeatures));
}

/// <summary>
/// Grouped-GEMM experts (<see cref="Core.Architectures.Runtime.ExpertsLayout.GroupedGemmInOut"/>, Aria's
/// <c>AriaExperts</c>): children <c>fc1</c> (<c>[E, H, 2I]</c>) and <c>fc2</c> (<c>[E, I, H]</c>) used as (in, out);
/// per expert <c>(silu(a) · b) · fc2[e]</c> with (a, b) = chunk(x · fc1[e], 2), each (token, slot) row weighted by
/// its routing weight and summed over the slots. transformers sorts the pairs by expert and runs one matmul per
/// expert; the per-expert loop here computes the same products.
/// </summary>
public sealed class GroupedGemmExperts : HfModule
{
    public GroupedGemm fc1 { get; }
    public GroupedGemm fc2 { get; }
    readonly long _experts;

    public GroupedGemmExperts(long experts, long hidden, long intermediate, Init init)
    {
        _experts = experts;
        fc1 = AddChild("fc1", new GroupedGemm(experts, hidden, 2 * intermediate, init));
        fc2 = AddChild("fc2", new GroupedGemm(experts, intermediate, hidden, init));
    }

    /// <param name="x">[T, H]</param><param name="topIdx">[T, k] int64</param><param name="topW">[T, k]</param>
    public Tensor Forward(Tensor x, Tensor topIdx, Tensor topW)
    {
        var counts = ExpertCounts.Read(topIdx, _experts);
        var final = zeros_like(x);
        for (long e = 0; e < _experts; e++)
        {
            if (counts[e] == 0) continue;
            var where = topIdx.eq(e).nonzero();
            var tok = where[.., 0];
            var ab = matmul(x.index_select(0, tok), fc1.weight[e]).chunk(2, -1);
            var h = matmul(nn.functional.silu(ab[0]) * ab[1], fc2.weight[e]);
            var w = topW.index(TensorIndex.Tensor(tok), TensorIndex.Tensor(where[.., 1])).unsqueeze(-1);
            final = final.index_add(0, tok, (h * w).to(final.dtype), 1.0);
        }
        return final;
    }
}
