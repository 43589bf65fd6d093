using TorchSharp;

namespace MoeLora.Torch.Runtime;

/// <summary>Turns a <c>--device</c> value into a TorchSharp device, failing with an actionable message.</summary>
public static class DeviceSelector
{
    public static torch.Device Select(string? name)
    {
        TorchRuntime.EnsureInitialized();
        var n = (name ?? "cpu").Trim().ToLowerInvariant();
        if (n == "cpu") return torch.CPU;
        if (n == "cuda" || n.StartsWith("cuda:", StringComparison.Ordinal))
        {
            if (!CudaAvailable())
                throw new DeviceUnavailableException(
                    $"--device {name}: CUDA is not available in this build. MoeLora.Torch references the CPU libtorch " +
                    "package; build with -p:MoeLoraCuda=true and add a CUDA libtorch package (see src/MoeLora.Torch/README.md), " +
                    "and make sure an NVIDIA driver is present. Use --device cpu to run on the CPU.");
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
}

public sealed class DeviceUnavailableException(string message) : Exception(message);
