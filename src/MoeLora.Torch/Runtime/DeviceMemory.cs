using System.Diagnostics;
using System.Globalization;
using System.Runtime.InteropServices;
using TorchSharp;

namespace MoeLora.Torch.Runtime;

/// <summary>Free memory of a device, with where the figure came from (for fit checks before anything is loaded).</summary>
public sealed record FreeMemory(long Bytes, string Source);

/// <summary>
/// Free memory on the CPU (<c>MemAvailable</c>) or a GPU. TorchSharp 0.107 has no <c>torch.cuda.mem_get_info</c>
/// (reference note §5), so CUDA asks the CUDA runtime libtorch already loaded (<c>cudaMemGetInfo</c> of the
/// libcudart mapped into this process), and falls back to <c>nvidia-smi --query-gpu=memory.free</c>.
/// </summary>
public static class DeviceMemory
{
    public static FreeMemory Free(torch.Device device)
    {
        if (device.type == DeviceType.CPU) return Host();
        if (device.type != DeviceType.CUDA) throw new NotSupportedException($"free memory of {device} is not known");
        int index = Math.Max(0, (int)device.index);
        if (CudaRuntimeFree(index) is { } free) return new FreeMemory(free, $"the free memory of cuda:{index} (cudaMemGetInfo)");
        if (NvidiaSmiFree(index) is { } smi) return new FreeMemory(smi, $"the free memory of cuda:{index} (nvidia-smi)");
        throw new MoeLora.Core.UserInputException($"cannot read the free memory of cuda:{index} (no libcudart in the process, nvidia-smi failed); pass the size explicitly");
    }

    /// <summary>
    /// Bytes in use on a GPU (total − free, cudaMemGetInfo; every process on the device and the CUDA context count),
    /// or this process's resident set on the CPU. Differences of two readings are what this process took in between.
    /// </summary>
    public static long Used(torch.Device device)
    {
        if (device.type == DeviceType.CPU) return ResidentBytes();
        int index = Math.Max(0, (int)device.index);
        if (CudaRuntimeInfo(index) is { } info) return info.Total - info.Free;
        if (NvidiaSmiQuery(index, "memory.used") is { } used) return used;
        throw new MoeLora.Core.UserInputException($"cannot read the memory in use on cuda:{index} (no libcudart in the process, nvidia-smi failed)");
    }

    /// <summary>VmRSS of this process (the working set where /proc is absent).</summary>
    public static long ResidentBytes()
    {
        if (OperatingSystem.IsLinux())
            foreach (var line in File.ReadLines("/proc/self/status"))
                if (line.StartsWith("VmRSS:", StringComparison.Ordinal))
                    return ProcKiBToBytes(line);
        return Environment.WorkingSet;
    }

    /// <summary>
    /// Resets VmHWM to the current resident set (writing 5 to /proc/self/clear_refs, Linux ≥ 4.0), so a later
    /// <see cref="PeakHostBytes"/> is the peak of what ran since. False where the kernel does not allow it.
    /// </summary>
    public static bool ResetPeakHost()
    {
        if (!OperatingSystem.IsLinux()) return false;
        try { File.WriteAllText("/proc/self/clear_refs", "5"); return true; }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException) { return false; }
    }

    /// <summary>MemAvailable of /proc/meminfo on Linux, else what the GC sees as available.</summary>
    public static FreeMemory Host()
    {
        if (OperatingSystem.IsLinux())
            foreach (var line in File.ReadLines("/proc/meminfo"))
                if (line.StartsWith("MemAvailable:", StringComparison.Ordinal))
                    return new FreeMemory(ProcKiBToBytes(line),
                        "the memory available on this machine (MemAvailable)");
        return new FreeMemory(GC.GetGCMemoryInfo().TotalAvailableMemoryBytes, "the memory available to this process");
    }

    /// <summary>Peak resident set (VmHWM) of this process, in bytes (0 where /proc is absent).</summary>
    public static long PeakHostBytes()
    {
        if (!OperatingSystem.IsLinux()) return 0;
        foreach (var line in File.ReadLines("/proc/self/status"))
            if (line.StartsWith("VmHWM:", StringComparison.Ordinal))
                return ProcKiBToBytes(line);
        return 0;
    }

    /// <summary>
    /// The value of a /proc "Key:  1234 kB" line in bytes. The kernel separates key and value with a tab and pads with
    /// spaces (a space-only split read "kB" as the number on the GPU host), so any whitespace separates.
    /// </summary>
    public static long ProcKiBToBytes(string line) =>
        long.Parse(line.Split([' ', '\t'], StringSplitOptions.RemoveEmptyEntries)[1], CultureInfo.InvariantCulture) * 1024;

    /// <summary>The CUDA runtime library mapped into this process (loaded by libtorch_cuda), from /proc/self/maps.</summary>
    internal static string? MappedLibrary(IEnumerable<string> mapsLines, string stem)
    {
        foreach (var line in mapsLines)
        {
            int slash = line.IndexOf('/', StringComparison.Ordinal);
            if (slash < 0) continue;
            var path = line[slash..].Trim();
            var file = Path.GetFileName(path);
            if (file.StartsWith(stem, StringComparison.Ordinal) && file.Contains(".so", StringComparison.Ordinal)) return path;
        }
        return null;
    }

    static long? CudaRuntimeFree(int index) => CudaRuntimeInfo(index)?.Free;

    static unsafe (long Free, long Total)? CudaRuntimeInfo(int index)
    {
        if (!OperatingSystem.IsLinux()) return null;
        try
        {
            var path = MappedLibrary(File.ReadLines("/proc/self/maps"), "libcudart");
            if (path is null) return null;
            var lib = NativeLibrary.Load(path);
            var getDevice = (delegate* unmanaged<int*, int>)NativeLibrary.GetExport(lib, "cudaGetDevice");
            var setDevice = (delegate* unmanaged<int, int>)NativeLibrary.GetExport(lib, "cudaSetDevice");
            var memGetInfo = (delegate* unmanaged<nuint*, nuint*, int>)NativeLibrary.GetExport(lib, "cudaMemGetInfo");
            int previous = 0;
            if (getDevice(&previous) != 0) return null;
            if (setDevice(index) != 0) return null;
            nuint free = 0, total = 0;
            int rc = memGetInfo(&free, &total);
            setDevice(previous);
            return rc == 0 ? ((long)free, (long)total) : null;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException or IOException)
        {
            return null;
        }
    }

    /// <summary>
    /// The compute capability's major version of cuda:<paramref name="index"/> (9 on Hopper), from the libcudart libtorch
    /// loaded (<c>cudaDeviceGetAttribute</c>); null where it cannot be read.
    /// </summary>
    public static unsafe int? ComputeCapabilityMajor(int index)
    {
        if (!OperatingSystem.IsLinux()) return null;
        try
        {
            var path = MappedLibrary(File.ReadLines("/proc/self/maps"), "libcudart");
            if (path is null) return null;
            var lib = NativeLibrary.Load(path);
            var getAttribute = (delegate* unmanaged<int*, int, int, int>)NativeLibrary.GetExport(lib, "cudaDeviceGetAttribute");
            const int ComputeCapabilityMajorAttribute = 75; // cudaDevAttrComputeCapabilityMajor
            int major = 0;
            return getAttribute(&major, ComputeCapabilityMajorAttribute, index) == 0 ? major : null;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException or IOException)
        {
            return null;
        }
    }

    static long? NvidiaSmiFree(int index) => NvidiaSmiQuery(index, "memory.free");

    /// <summary>A memory field of nvidia-smi (MiB) in bytes.</summary>
    static long? NvidiaSmiQuery(int index, string field)
    {
        var text = Run("nvidia-smi", $"--query-gpu={field}", "--format=csv,noheader,nounits");
        if (text is null) return null;
        var lines = text.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        return index < lines.Length && long.TryParse(lines[index].Trim(), NumberStyles.Integer, CultureInfo.InvariantCulture, out var mib) ? mib * 1024 * 1024 : null;
    }

    /// <summary>One line about the GPUs nvidia-smi sees (for "CUDA is not available" messages).</summary>
    public static string NvidiaSmiSummary()
    {
        var text = Run("nvidia-smi", "-L");
        if (text is null) return "nvidia-smi did not run (no NVIDIA driver on this machine?)";
        var gpus = text.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        return gpus.Length == 0 ? "nvidia-smi lists no GPU" : $"nvidia-smi lists {gpus.Length} GPU(s), first: {gpus[0].Trim()}";
    }

    static string? Run(string file, params string[] args)
    {
        try
        {
            var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            foreach (var a in args) psi.ArgumentList.Add(a);
            using var p = Process.Start(psi);
            if (p is null) return null;
            var output = p.StandardOutput.ReadToEndAsync();
            _ = p.StandardError.ReadToEndAsync();
            if (!p.WaitForExit(TimeSpan.FromSeconds(20))) { try { p.Kill(); } catch (InvalidOperationException) { } return null; }
            return p.ExitCode == 0 ? output.Result : null;
        }
        catch (System.ComponentModel.Win32Exception) { return null; }
    }
}
