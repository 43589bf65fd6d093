using System.Security.Cryptography;
using MoeLora.Torch.Runtime;
using TorchSharp;

namespace MoeLora.Torch.Tests;

public class RuntimeTests
{
    public RuntimeTests() => TorchRuntime.EnsureInitialized();

    [Fact]
    public void CreatesTensorsAndRunsAutograd()
    {
        using var a = torch.ones(2, 3, requires_grad: true);
        using var b = (a * 2).sum();
        b.backward();
        Assert.Equal(12.0f, b.item<float>());
        Assert.Equal(2.0f, a.grad!.mean().item<float>());
    }

    [Fact]
    public void PatchedLibraryMatchesTheCheckedBytesAndIsIdempotent()
    {
        if (!OperatingSystem.IsLinux()) return;
        var path = Path.Combine(AppContext.BaseDirectory, "runtimes", "linux-x64", "native", "libLibTorchSharp.so");
        var bytes = File.ReadAllBytes(path);
        // SHA-256 of TorchSharp 0.107.0's library after the three edits, as checked on Debian 12 (reference note §10.5).
        Assert.Equal("9f47c390649ce9c50b2acbb78e8ab6ec7285583424995bbdaf883975cd9b6fcc",
            Convert.ToHexString(SHA256.HashData(bytes)).ToLowerInvariant());
        Assert.Equal(LibTorchSharpElfPatch.Result.AlreadyPatched, LibTorchSharpElfPatch.Patch(bytes));
    }

    [Fact]
    public void CudaRequestSaysClearlyWhenUnavailable()
    {
        if (DeviceSelector.CudaAvailable()) return;
        var e = Assert.Throws<DeviceUnavailableException>(() => DeviceSelector.Select("cuda"));
        Assert.Contains("CUDA is not available", e.Message);
        Assert.Equal(DeviceType.CPU, DeviceSelector.Select("cpu").type);
    }

    [Fact]
    public void RejectsNonElfInput() =>
        Assert.Throws<InvalidDataException>(() => LibTorchSharpElfPatch.Patch(new byte[100]));
}
