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
        Console.Error.WriteLine($"memtrace {phase}: {DeviceMemory.Used(device) / (double)(1L << 30):0.00} GiB in use on {device}");
    }
}
