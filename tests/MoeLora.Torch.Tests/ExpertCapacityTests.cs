using CsCheck;
using MoeLora.Torch.Nn;

namespace MoeLora.Torch.Tests;

/// <summary>The padded part's capacity (<see cref="ExpertCapacity"/>): the cheapest within the padding bound.</summary>
public class ExpertCapacityTests
{
    static double Cost(long[] counts, long c, double segment) =>
        (double)counts.Length * c + counts.Where(n => n > c).Sum(n => segment + n - c);

    static readonly Gen<(long[] Counts, double Segment, double Factor, long Free)> Cases =
        Gen.Select(Gen.Long[0, 400].Array[1, 40], Gen.Double[0, 5000], Gen.Double[0, 6], Gen.Long[0, 4000]);

    [Fact]
    public void Is_the_cheapest_capacity_within_the_padding_bound() =>
        Cases.Sample(t =>
        {
            var (counts, segment, factor, free) = t;
            var c = ExpertCapacity.Choose(counts, segment, factor, free);
            long pairs = counts.Sum();
            if (pairs == 0) return c == 0;
            var cost = Cost(counts, c, segment);
            var bound = Math.Max(factor * pairs, free);
            return counts.Length * c <= bound + 1e-9
                && Enumerable.Range(0, (int)counts.Max() + 1).Where(x => counts.Length * (long)x <= bound)
                    .All(x => cost <= Cost(counts, x, segment) + 1e-6);
        }, iter: 300);

    [Fact]
    public void The_plan_places_every_row_once_tier_by_tier() =>
        Gen.Select(Cases, Gen.Long[1, 6].Nullable()).Sample(t =>
        {
            var ((counts, segment, factor, free), forced) = t;
            var (tiers, segments) = ExpertCapacity.Plan(counts, segment, factor, free, forced);
            var placed = new long[counts.Length];
            long offset = 0;
            for (int i = 0; i < tiers.Count; i++)
            {
                var tier = tiers[i];
                // Tiers follow one another within each expert; a later tier holds exactly the experts with rows left.
                if (tier.Offset != offset || tier.Capacity <= 0) return false;
                var members = Enumerable.Range(0, counts.Length).Where(e => counts[e] > offset).ToArray();
                if (tier.Experts != (i == 0 ? counts.Length : members.Length) || (i > 0 && members.Length < 2)) return false;
                foreach (var e in members) placed[e] += Math.Min(counts[e] - offset, tier.Capacity);
                if (tier.Rows != members.Sum(e => Math.Min(counts[e] - offset, tier.Capacity))) return false;
                if (forced is { } f && tier.Capacity != Math.Min(f, counts.Max() - offset)) return false;
                offset += tier.Capacity;
            }
            // The segments take each expert's rows after the last tier, in expert order.
            if (!segments.Select(s => s.Expert).SequenceEqual(segments.Select(s => s.Expert).Order())) return false;
            foreach (var (e, start, length) in segments)
            {
                if (start != offset || length <= 0) return false;
                placed[e] += length;
            }
            return placed.SequenceEqual(counts);
        }, iter: 300);

    [Fact]
    public void The_busier_experts_share_a_second_tier()
    {
        // A random-init Qwen3-30B-A3B layer as measured on an H100: most experts near the mean, eleven far busier.
        var counts = Enumerable.Repeat(40L, 117).Concat([150, 160, 170, 180, 200, 220, 240, 260, 300, 400, 1_000]).ToArray();
        var (tiers, segments) = ExpertCapacity.Plan(counts, 4096, 4, 16_384);
        Assert.True(tiers.Count >= 2, $"{tiers.Count} tiers");
        Assert.True(tiers.Count + segments.Count <= 3, $"{tiers.Count} tiers and {segments.Count} segments where 11 experts overflow the first tier");
        // Without tiers beyond the first (a zero factor and no free rows), every expert is a segment.
        Assert.Equal(counts.Length, ExpertCapacity.Plan(counts, 4096, 0).Segments.Count);
    }

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

/// <summary>
/// With the GPU's capacity settings, the tensors a MoE layer's forward creates (a proxy for the kernels it launches)
/// do not grow with the number of experts, whatever the routing: the per-expert segments that made a GPU step
/// launch-bound are only for the few experts far busier than the rest. Counted, not timed.
/// </summary>
public class ExpertLaunchCountTests
{
    public ExpertLaunchCountTests() => Runtime.TorchRuntime.EnsureInitialized();

    static long TensorsCreated(int experts, double maxPaddingFactor)
    {
        var config = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.Dir("qwen3_moe"), "model", "config.json")))!.AsObject();
        config["num_experts"] = experts;
        using var holder = new DisposableModel(Models.TorchModelFactory.Random(config.ToJsonString(), 5));
        var model = holder.Model;
        var (segment, factor, free) = ExpertCapacity.Defaults(new TorchSharp.torch.Device("cuda"));
        foreach (var e in model.NamedModules().Select(m => m.Module).OfType<ExpertsBase>())
        {
            // The padded path, as a GPU without grouped_mm's fast path (or in fp32) runs it.
            e.Dispatching = ExpertDispatch.Padded;
            (e.SegmentCostRows, e.MaxPaddingFactor, e.FreePaddedRows) = maxPaddingFactor == 0 ? (segment, 0, 0) : (segment, factor, free);
        }
        var stats = TorchSharp.DisposeScopeManager.Statistics.TensorStatistics;
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var _ = TorchSharp.torch.no_grad();
        long before = stats.CreatedInScopeCount + stats.CreatedOutsideScopeCount;
        using (TorchSharp.torch.NewDisposeScope()) model.Forward(ids, mask);
        return stats.CreatedInScopeCount + stats.CreatedOutsideScopeCount - before;
    }

    [Fact]
    public void A_forward_creates_as_many_tensors_with_64_experts_as_with_8()
    {
        long few = TensorsCreated(8, 4), many = TensorsCreated(64, 4);
        Assert.True(many <= few + few / 10, $"{few} tensors with 8 experts, {many} with 64");
        // One matmul per expert segment instead: the count grows with the experts the 40 routed pairs reach.
        long fewSegments = TensorsCreated(8, 0), manySegments = TensorsCreated(64, 0);
        Assert.True(manySegments > fewSegments + fewSegments / 2, $"segments: {fewSegments} tensors with 8 experts, {manySegments} with 64");
    }
}
