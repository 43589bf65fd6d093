using CsCheck;
using MoeLora.Torch.Nn;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary><see cref="ExpertCounts"/>: the pairs routed to each expert, as torch's <c>bincount(minlength)</c> counts them.</summary>
public class ExpertCountsTests
{
    [Fact]
    public void Counts_every_id_once_and_leaves_unused_experts_at_zero() =>
        Gen.Select(Gen.Int[1, 40], Gen.Int[1, 8], Gen.Int[1, 33]).SelectMany((size, k, tokens) =>
            Gen.Int[0, size - 1].Array[tokens * k].Select(ids => (size, k, ids))).Sample(t =>
        {
            var (size, k, ids) = t;
            using var scope = NewDisposeScope();
            var topIdx = tensor(ids.Select(i => (long)i).ToArray(), ScalarType.Int64).reshape(-1, k);
            var counts = ExpertCounts.Read(topIdx, size);
            var expected = Enumerable.Range(0, size).Select(e => (long)ids.Count(i => i == e)).ToArray();
            return counts.SequenceEqual(expected)
                && counts.SequenceEqual(topIdx.flatten().bincount(null, size).data<long>().ToArray());
        }, iter: 200);

    [Fact]
    public void Counts_stay_on_the_ids_device_without_gradients()
    {
        using var scope = NewDisposeScope();
        var counts = ExpertCounts.OnDevice(tensor(new long[] { 2, 0, 2 }), 4);
        Assert.Equal(ScalarType.Int64, counts.dtype);
        Assert.False(counts.requires_grad);
        Assert.Equal(new long[] { 1, 0, 2, 0 }, counts.data<long>().ToArray());
    }
}
