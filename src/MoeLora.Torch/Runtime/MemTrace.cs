using TorchSharp;

namespace MoeLora.Torch.Runtime;

/// <summary>
/// With <c>MOELORA_MEMTRACE=1</c>, one stderr line per marked phase: the device memory in use (on CUDA what the
/// driver reports, the caching allocator's reservations included; on the CPU the resident set). For finding where a
/// real-size step's memory goes on a GPU host, where a profiler is not at hand; off by default and free when off.
/// Each line also gives the wall time since the previous mark and how much of it the closing synchronisation waited:
/// a phase whose wait is near zero was paced by the host (kernel launches, host reads), not by the GPU.
/// </summary>
public static class MemTrace
{
    static readonly bool On = Environment.GetEnvironmentVariable("MOELORA_MEMTRACE") == "1";

    public static void Mark(string phase, torch.Device device)
    {
        if (!On) return;
        long issued = System.Diagnostics.Stopwatch.GetTimestamp();
        if (device.type == TorchSharp.DeviceType.CUDA) torch.cuda.synchronize(device);
        long done = System.Diagnostics.Stopwatch.GetTimestamp();
        long previous = Interlocked.Exchange(ref _lastMark, done);
        // Tensors created on this side (the host's operations; autograd's own backward kernels are not counted).
        var stats = DisposeScopeManager.Statistics.TensorStatistics;
        long created = stats.CreatedInScopeCount + stats.CreatedOutsideScopeCount;
        long tensors = created - Interlocked.Exchange(ref _lastCreated, created);
        var timing = previous == 0 ? "" :
            $"; {System.Diagnostics.Stopwatch.GetElapsedTime(previous, done).TotalMilliseconds:0} ms since the last mark, " +
            $"{System.Diagnostics.Stopwatch.GetElapsedTime(issued, done).TotalMilliseconds:0} ms of it waiting for the device, {tensors} tensors created";
        var experts = "";
        if (Interlocked.Exchange(ref _dispatches, 0) is var d && d > 0)
        {
            long segments = Interlocked.Exchange(ref _segments, 0), pairs = Interlocked.Exchange(ref _pairs, 0), rows = Interlocked.Exchange(ref _paddedRows, 0),
                tiers = Interlocked.Exchange(ref _tiers, 0), grouped = Interlocked.Exchange(ref _groupedMm, 0);
            experts = $"; experts since the last mark: {d} dispatches ({grouped} as grouped_mm), padded rows {rows / (double)Math.Max(1, pairs):0.00}x the routed pairs, " +
                $"{tiers / (double)d:0.0} padded tiers and {segments / (double)d:0.0} per-expert segments each";
        }
        Console.Error.WriteLine($"memtrace {phase}: {DeviceMemory.Used(device) / (double)(1L << 30):0.00} GiB in use on {device}{timing}{experts}");
    }

    static long _dispatches, _segments, _pairs, _paddedRows, _tiers, _groupedMm, _lastMark, _lastCreated;

    /// <summary>Counts one grouped expert dispatch (padded rows, padded tiers, per-expert segments, routed pairs) for the next mark.</summary>
    public static void CountDispatch(long paddedRows, long tiers, long segments, long pairs, bool groupedMm = false)
    {
        if (!On) return;
        Interlocked.Increment(ref _dispatches);
        if (groupedMm) Interlocked.Increment(ref _groupedMm);
        Interlocked.Add(ref _tiers, tiers);
        Interlocked.Add(ref _segments, segments);
        Interlocked.Add(ref _pairs, pairs);
        Interlocked.Add(ref _paddedRows, paddedRows);
    }
}
