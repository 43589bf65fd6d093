using TorchSharp;

namespace MoeLora.Torch.Runtime;

/// <summary>Turns a <c>--device</c> value into a TorchSharp device, failing with an actionable message.</summary>
public static class DeviceSelector
{
    /// <summary>
    /// The device for <paramref name="name"/> ("cpu", "cuda", "cuda:N"). Call it before anything else touches TorchSharp:
    /// a CUDA request picks a CUDA libtorch at initialisation (<see cref="TorchRuntime.EnsureInitialized(bool)"/>).
    /// </summary>
    public static torch.Device Select(string? name)
    {
        var n = (name ?? "cpu").Trim().ToLowerInvariant();
        if (n == "cpu")
        {
            TorchRuntime.EnsureInitialized();
            return torch.CPU;
        }
        if (n == "cuda" || n.StartsWith("cuda:", StringComparison.Ordinal))
        {
            int index = 0;
            if (n.Length > 4 && (!int.TryParse(n[5..], System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out index)))
                throw new DeviceUnavailableException($"--device {name}: expected cuda:N with a GPU index N.");
            try { TorchRuntime.EnsureInitialized(wantCuda: true); }
            catch (LibTorchException e) { throw new DeviceUnavailableException($"--device {name}: CUDA is not available: {e.Message}."); }
            if (!CudaAvailable())
                throw new DeviceUnavailableException($"--device {name}: CUDA is not available: {WhyNot()}. Use --device cpu to run on the CPU.");
            int count = torch.cuda.device_count();
            if (index >= count) throw new DeviceUnavailableException($"--device {name}: there {(count == 1 ? "is 1 GPU" : $"are {count} GPUs")} (cuda:0..cuda:{count - 1}).");
            return torch.device(n);
        }
        throw new DeviceUnavailableException($"--device {name}: unknown device; expected 'cpu', 'cuda' or 'cuda:N'.");
    }

    /// <summary>True only if a CUDA libtorch backend loads and sees a GPU; never throws.</summary>
    public static bool CudaAvailable()
    {
        try { return torch.TryInitializeDeviceType(DeviceType.CUDA) && torch.cuda.is_available(); }
        catch (Exception) { return false; }
    }

    /// <summary>One line: no CUDA libtorch (and where it was looked for), or a CUDA libtorch without a visible GPU.</summary>
    static string WhyNot()
    {
        if (TorchRuntime.CudaUnavailableReason() is { } reason) return reason;
        return $"the {TorchRuntime.LibTorchDescription} sees no GPU (torch.cuda.is_available() is false): {DeviceMemory.NvidiaSmiSummary()}";
    }
}

public sealed class DeviceUnavailableException(string message) : MoeLora.Core.UserInputException(message);
