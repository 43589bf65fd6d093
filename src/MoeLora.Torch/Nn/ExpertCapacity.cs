using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// How many rows of each expert the padded batched matmul takes; a busier expert's rows beyond that run as its own
/// matmuls (a segment). The capacity c minimises
/// <c>E·c + Σ over experts with n_e &gt; c of (B + n_e − c)</c>: the padded buffer's rows, plus for each expert over c its
/// remaining rows and B, the cost of launching its own matmuls counted in rows; E·c stays within f × the routed pairs,
/// or within a fixed number of rows F where that is more (a short batch's padding costs next to nothing).
/// <para>
/// Why: on a GPU a segment's ten or so small kernels cost far more than the FLOPs of a padded row, so one padded matmul
/// beats one matmul per expert even at several times the rows; but one expert taking most tokens (a randomly
/// initialised Qwen3-30B-A3B sends nearly every token to one expert: 16× the mean) would pad every other expert to its
/// size. Letting that expert run on its own keeps the padding near the typical count.
/// </para>
/// </summary>
internal static class ExpertCapacity
{
    /// <summary>
    /// (B, f, F) by device. CUDA: B 4096 (a segment's kernel launches take about as long as the FLOPs of a few thousand
    /// rows of a Qwen3-size expert on an H100), f 4 and F 16,384 rows (the padded rows live only while one layer's
    /// experts run, see <see cref="ExpertRecompute"/>). CPU: B 64, f 1.5, F 0, since every padded row costs its full
    /// FLOPs there.
    /// </summary>
    public static (double SegmentCostRows, double MaxPaddingFactor, long FreePaddedRows) Defaults(Device device) =>
        device.type == TorchSharp.DeviceType.CUDA ? (4096, 4.0, 16_384) : (64, 1.5, 0);

    /// <summary>The capacity for per-expert <paramref name="counts"/> (0: every expert as its own segment).</summary>
    public static long Choose(IReadOnlyList<long> counts, double segmentCostRows, double maxPaddingFactor, long freePaddedRows = 0)
    {
        int experts = counts.Count;
        long pairs = counts.Sum();
        if (experts == 0 || pairs == 0) return 0;
        long limit = (long)Math.Floor(Math.Max(maxPaddingFactor * pairs, freePaddedRows) / experts);
        var sorted = counts.Order().ToArray();
        // suffix[i]: the rows of the experts sorted at i and after.
        var suffix = new long[experts + 1];
        for (int i = experts - 1; i >= 0; i--) suffix[i] = suffix[i + 1] + sorted[i];

        double Cost(long c)
        {
            int first = UpperBound(sorted, c);   // experts from here on have more than c rows
            long over = experts - first;
            return (double)experts * c + over * segmentCostRows + (suffix[first] - over * c);
        }

        // The cost is linear in c between two distinct counts, so its minimum is at 0, a count, or the limit.
        long best = 0;
        double bestCost = Cost(0);
        foreach (var c in sorted.Where(x => x > 0 && x <= limit).Distinct().Append(Math.Min(limit, sorted[^1])))
        {
            var cost = Cost(c);
            if (cost < bestCost) (best, bestCost) = (c, cost);
        }
        return best;
    }

    static int UpperBound(long[] sorted, long value)
    {
        int lo = 0, hi = sorted.Length;
        while (lo < hi)
        {
            int mid = (lo + hi) / 2;
            if (sorted[mid] <= value) lo = mid + 1; else hi = mid;
        }
        return lo;
    }
}
