using CsCheck;
using MoeLora.Torch.Nn;

namespace MoeLora.Torch.Tests;

/// <summary>The padded part's capacity (<see cref="ExpertCapacity"/>): the cheapest within the padding bound.</summary>
public class ExpertCapacityTests
{
    static double Cost(long[] counts, long c, double segment) =>
        (double)counts.Length * c + counts.Where(n => n > c).Sum(n => segment + n - c);

    static readonly Gen<(long[] Counts, double Segment, double Factor)> Cases =
        Gen.Select(Gen.Long[0, 400].Array[1, 40], Gen.Double[0, 5000], Gen.Double[0, 6]);

    [Fact]
    public void Is_the_cheapest_capacity_within_the_padding_bound() =>
        Cases.Sample(t =>
        {
            var (counts, segment, factor) = t;
            var c = ExpertCapacity.Choose(counts, segment, factor);
            long pairs = counts.Sum();
            if (pairs == 0) return c == 0;
            var cost = Cost(counts, c, segment);
            return counts.Length * c <= factor * pairs + 1e-9
                && Enumerable.Range(0, (int)counts.Max() + 1).Where(x => counts.Length * (long)x <= factor * pairs)
                    .All(x => cost <= Cost(counts, x, segment) + 1e-6);
        }, iter: 300);

    [Fact]
    public void One_expert_taking_most_tokens_runs_on_its_own()
    {
        // A random-init Qwen3-30B-A3B layer: 1,024 tokens × top-8, one expert taking nearly every token.
        var counts = Enumerable.Repeat(56L, 127).Append(1_072).ToArray();
        var (segment, factor) = (4096.0, 4.0);
        Assert.Equal(56, ExpertCapacity.Choose(counts, segment, factor));
        // Balanced routing pads everything; a zero factor runs every expert as its own segment.
        Assert.Equal(64, ExpertCapacity.Choose(Enumerable.Repeat(64L, 128).ToArray(), segment, factor));
        Assert.Equal(0, ExpertCapacity.Choose(counts, segment, 0));
    }
}
