using TorchSharp;

namespace MoeLora.Torch.Runtime;

/// <summary>
/// With <c>MOELORA_MEMTRACE=1</c>, one stderr line per marked phase: the device memory in use (on CUDA what the
/// driver reports, the caching allocator's reservations included; on the CPU the resident set). For finding where a
/// real-size step's memory goes on a GPU host, where a profiler is not at hand; off by default and free when off.
/// </summary>
public static class MemTrace
{
    static readonly bool On = Environment.GetEnvironmentVariable("MOELORA_MEMTRACE") == "1";

    public static void Mark(string phase, torch.Device device)
    {
        if (!On) return;
        if (device.type == TorchSharp.DeviceType.CUDA) torch.cuda.synchronize(device);
        var experts = "";
        if (Interlocked.Exchange(ref _dispatches, 0) is var d && d > 0)
        {
            long segments = Interlocked.Exchange(ref _segments, 0), pairs = Interlocked.Exchange(ref _pairs, 0), rows = Interlocked.Exchange(ref _paddedRows, 0);
            experts = $"; experts since the last mark: {d} dispatches, padded rows {rows / (double)Math.Max(1, pairs):0.00}x the routed pairs, {segments / (double)d:0.0} per-expert segments each";
        }
        Console.Error.WriteLine($"memtrace {phase}: {DeviceMemory.Used(device) / (double)(1L << 30):0.00} GiB in use on {device}{experts}");
    }

    static long _dispatches, _segments, _pairs, _paddedRows;

    /// <summary>Counts one grouped expert dispatch (padded rows, per-expert segments, routed pairs) for the next mark.</summary>
    public static void CountDispatch(long paddedRows, long segments, long pairs)
    {
        if (!On) return;
        Interlocked.Increment(ref _dispatches);
        Interlocked.Add(ref _segments, segments);
        Interlocked.Add(ref _pairs, pairs);
        Interlocked.Add(ref _paddedRows, paddedRows);
    }
}
