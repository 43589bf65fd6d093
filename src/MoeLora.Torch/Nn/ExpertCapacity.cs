using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// How the (token, slot) rows sorted by expert run: in padded batched matmuls (tiers) and, for what is left, one matmul
/// per expert (a segment).
/// <para>
/// A tier takes up to c rows of each expert it holds into a padded buffer [experts × c]: the first tier every expert's
/// first c₀ rows (the expert weights used as they are), each later tier the rows after the tiers before it of the
/// experts that still have some (their weights gathered). Its capacity c minimises
/// <c>E·c + Σ over experts with n_e &gt; c of (B + n_e − c)</c> over that tier's E experts and remaining counts n_e: the
/// padded rows, plus for each expert over c its remaining rows and B, the cost of launching its own matmuls counted in
/// rows; E·c stays within f × the tier's rows, or within a fixed number of rows F where that is more (a short batch's
/// padding costs next to nothing). Tiers follow until every row is placed, one expert is left (a segment) or segments
/// are cheaper (c = 0).
/// </para>
/// <para>
/// Why: on a GPU a segment's ten or so small kernels cost far more than the FLOPs of a padded row, so one padded matmul
/// beats one matmul per expert even at several times the rows; but one expert taking most tokens (a randomly
/// initialised Qwen3-30B-A3B sends nearly every token to one expert: 16× the mean) would pad every other expert to its
/// size. The first tier keeps the padding near the typical count; the few busier experts share the next tiers instead
/// of launching their own matmuls each (measured on an H100: eleven segments per layer were most of the tensors a step
/// created).
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
    /// <para>
    /// <c>MOELORA_EXPERT_CAPACITY=B,f,F</c> overrides them on every device: a tuning knob for measuring other settings
    /// on a GPU host without a rebuild.
    /// </para>
    public static (double SegmentCostRows, double MaxPaddingFactor, long FreePaddedRows) Defaults(Device device) =>
        Override.Value ?? (device.type == TorchSharp.DeviceType.CUDA ? (4096, 4.0, 16_384) : (64, 1.5, 0));

    static readonly Lazy<(double, double, long)?> Override = new(() => ParseOverride(Environment.GetEnvironmentVariable("MOELORA_EXPERT_CAPACITY")));

    internal static (double, double, long)? ParseOverride(string? value)
    {
        if (string.IsNullOrWhiteSpace(value)) return null;
        var parts = value.Split(',');
        var inv = System.Globalization.CultureInfo.InvariantCulture;
        if (parts.Length == 3 && double.TryParse(parts[0], inv, out var b) && double.TryParse(parts[1], inv, out var f)
            && long.TryParse(parts[2], inv, out var free) && b >= 0 && f >= 0 && free >= 0)
            return (b, f, free);
        throw new Core.UserInputException($"MOELORA_EXPERT_CAPACITY '{value}' is not 'B,f,F' (segment cost in rows, padding factor, free padded rows; none negative).");
    }

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

    /// <summary>One tier: <see cref="Experts"/> experts (those with more than <see cref="Offset"/> rows) each give up to
    /// <see cref="Capacity"/> of their rows from <see cref="Offset"/> on; <see cref="Rows"/> rows in all.</summary>
    public sealed record Tier(long Offset, long Capacity, long Experts, long Rows);

    /// <summary>The tiers and then the segments (expert, first row within the expert, rows) for <paramref name="counts"/>.</summary>
    /// <param name="forcedCapacity">Tests: every tier's capacity (the last expert standing still runs as a segment).</param>
    public static (IReadOnlyList<Tier> Tiers, IReadOnlyList<(long Expert, long Start, long Length)> Segments) Plan(
        IReadOnlyList<long> counts, double segmentCostRows, double maxPaddingFactor, long freePaddedRows = 0, long? forcedCapacity = null)
    {
        var tiers = new List<Tier>();
        long offset = 0;
        while (true)
        {
            var left = counts.Where(n => n > offset).Select(n => n - offset).ToArray();
            // The first tier holds every expert (its weights need no gathering), so it is worth having for two experts
            // or one alike; a later tier of one expert is just that expert's segment.
            if (left.Length == 0 || (tiers.Count > 0 && left.Length == 1)) break;
            long experts = tiers.Count == 0 ? counts.Count : left.Length;
            var tierCounts = tiers.Count == 0 ? counts : left;
            long c = Math.Min(left.Max(), forcedCapacity ?? Choose(tierCounts, segmentCostRows, maxPaddingFactor, freePaddedRows));
            if (c <= 0) break;
            tiers.Add(new Tier(offset, c, experts, left.Sum(n => Math.Min(n, c))));
            offset += c;
        }
        var segments = new List<(long, long, long)>();
        for (int e = 0; e < counts.Count; e++)
            if (counts[e] > offset) segments.Add((e, offset, counts[e] - offset));
        return (tiers, segments);
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
