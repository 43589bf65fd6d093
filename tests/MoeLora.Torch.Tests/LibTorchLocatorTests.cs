using MoeLora.Torch.Runtime;
using MoeLora.Torch.Tests.Training;

namespace MoeLora.Torch.Tests;

/// <summary>Which libtorch TorchRuntime loads, decided over fake folders (empty files named like libtorch's).</summary>
public class LibTorchLocatorTests
{
    static string Lib(string root, string name, bool cuda, string? version = null)
    {
        var pkg = Path.Combine(root, name, "torch");
        var lib = Path.Combine(pkg, "lib");
        Directory.CreateDirectory(lib);
        foreach (var f in new[] { "libc10.so", "libtorch_cpu.so", "libtorch.so", "libgomp-abc.so.1" }) File.WriteAllText(Path.Combine(lib, f), "");
        if (cuda) foreach (var f in new[] { "libc10_cuda.so", "libtorch_cuda.so" }) File.WriteAllText(Path.Combine(lib, f), "");
        if (version is not null) File.WriteAllText(Path.Combine(pkg, "version.py"), $"from typing import Optional\n__version__ = '{version}'\ngit_version = 'x'\n");
        return pkg;
    }

    static Func<PythonTorch> Python(string? pkg) => () => pkg is null ? new PythonTorch(null, "has no torch package") : new PythonTorch(pkg, $"imports torch from {pkg}");
    static Func<PythonTorch> NotAsked => () => throw new InvalidOperationException("python3 must not be asked");

    [Fact]
    public void ACpuRunUsesTheBundledLibTorchWithoutAskingPython()
    {
        using var t = new TempDir();
        var app = Path.GetDirectoryName(Lib(t.Path, "app", cuda: false))!; // app/torch/lib stands for the app's native folder
        var native = Path.Combine(app, "torch", "lib");
        var s = LibTorchLocator.Locate(false, [native], null, NotAsked);
        Assert.Equal(LibTorchSource.Bundled, s.Choice!.Source);
        Assert.Empty(s.Choice.Preload); // TorchSharp loads a bundled libtorch itself
        Assert.Null(s.CudaUnavailableReason);
    }

    [Fact]
    public void ACudaRunUsesPythonsCudaTorchInABuildWithoutLibTorchAndPreloadsInDependencyOrder()
    {
        using var t = new TempDir();
        var native = Path.Combine(t.Path, "app-without-libtorch");
        Directory.CreateDirectory(native);
        var py = Lib(t.Path, "site-packages", cuda: true, version: "2.11.0+cu130");
        var s = LibTorchLocator.Locate(true, [native], null, Python(py));
        Assert.Equal(LibTorchSource.Python, s.Choice!.Source);
        Assert.True(s.Choice.HasCuda);
        Assert.Equal("2.11.0+cu130", s.Choice.Version);
        Assert.Equal(["libc10.so", "libtorch_cpu.so", "libc10_cuda.so", "libtorch_cuda.so", "libtorch.so"], s.Choice.Preload.Select(Path.GetFileName));
        Assert.All(s.Choice.Preload, p => Assert.True(Path.IsPathRooted(p)));
        Assert.Null(s.CudaUnavailableReason);
        Assert.Contains("python3's PyTorch", s.Choice.Describe());
        Assert.Contains("torch 2.11.0+cu130", s.Choice.Describe());
    }

    [Fact]
    public void ABuildBundlingTheCpuLibTorchNeverLoadsASecondOneAndSaysHowToGetCuda()
    {
        using var t = new TempDir();
        var native = Path.Combine(Lib(t.Path, "app", cuda: false), "lib");
        var py = Lib(t.Path, "site-packages", cuda: true);
        var s = LibTorchLocator.Locate(true, [native], null, Python(py));
        Assert.Equal(LibTorchSource.Bundled, s.Choice!.Source);
        Assert.Empty(s.Choice.Preload);
        Assert.Contains("-p:MoeLoraCuda=true", s.CudaUnavailableReason);
        var e = Assert.Throws<LibTorchException>(() => LibTorchLocator.Locate(false, [native], py, NotAsked));
        Assert.Contains("bundles the CPU libtorch", e.Message);
    }

    [Fact]
    public void TorchSharpsCudaPackageNextToTheAppWinsOverPython()
    {
        using var t = new TempDir();
        var native = Path.Combine(Lib(t.Path, "app", cuda: true), "lib");
        var s = LibTorchLocator.Locate(true, [native], null, NotAsked);
        Assert.Equal(LibTorchSource.Bundled, s.Choice!.Source);
        Assert.True(s.Choice.HasCuda);
    }

    [Fact]
    public void TheEnvironmentVariableWinsAndAcceptsTheTorchPackageOrItsLibFolder()
    {
        using var t = new TempDir();
        var native = Path.Combine(t.Path, "app-without-libtorch");
        Directory.CreateDirectory(native);
        var pkg = Lib(t.Path, "custom", cuda: true);
        foreach (var value in new[] { pkg, Path.Combine(pkg, "lib") })
        {
            var s = LibTorchLocator.Locate(true, [native], value, NotAsked);
            Assert.Equal(LibTorchSource.Environment, s.Choice!.Source);
            Assert.Equal(Path.GetFullPath(Path.Combine(pkg, "lib")), s.Choice.Directory);
        }
        var cpuOnly = Lib(t.Path, "cpuonly", cuda: false);
        var r = LibTorchLocator.Locate(true, [native], cpuOnly, NotAsked);
        Assert.Equal(LibTorchSource.Environment, r.Choice!.Source);
        Assert.Contains("without CUDA", r.CudaUnavailableReason);
        var e = Assert.Throws<LibTorchException>(() => LibTorchLocator.Locate(false, [native], Path.Combine(t.Path, "nowhere"), NotAsked));
        Assert.Contains(LibTorchLocator.EnvironmentVariable, e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }

    [Fact]
    public void WithoutAnyCudaLibTorchTheCpuOneIsKeptAndTheReasonNamesEverySource()
    {
        using var t = new TempDir();
        var native = Path.Combine(Lib(t.Path, "app", cuda: false), "lib");
        var s = LibTorchLocator.Locate(true, [native], null, Python(null));
        Assert.Equal(LibTorchSource.Bundled, s.Choice!.Source);
        Assert.False(s.Choice.HasCuda);
        Assert.Equal("no CUDA libtorch found: the application bundles the CPU-only libtorch, MOELORA_LIBTORCH is unset, and python3 has no torch package",
            s.CudaUnavailableReason);
        var cpuTorch = Lib(t.Path, "site-packages", cuda: false, version: "2.11.0+cpu");
        var c = LibTorchLocator.Locate(true, [native], null, Python(cpuTorch));
        Assert.Contains("has no CUDA (no libtorch_cuda.so; torch 2.11.0+cpu)", c.CudaUnavailableReason);
    }

    [Fact]
    public void AnAppWithoutBundledLibTorchRunsOnPythonsAndOtherwiseSaysWhatToInstall()
    {
        using var t = new TempDir();
        var stripped = Path.Combine(t.Path, "stripped");
        Directory.CreateDirectory(stripped);
        var py = Lib(t.Path, "site-packages", cuda: true);
        var s = LibTorchLocator.Locate(false, [stripped], null, Python(py));
        Assert.Equal(LibTorchSource.Python, s.Choice!.Source);
        Assert.Equal(5, s.Choice.Preload.Count);
        var none = LibTorchLocator.Locate(false, [stripped], null, Python(null));
        Assert.Null(none.Choice);
        Assert.Contains("no libtorch found", none.NoLibTorchReason);
        Assert.Contains("python3 has no torch package", none.NoLibTorchReason);
    }

    [Fact]
    public void ThePythonProbeAnswersWithoutThrowing()
    {
        var p = LibTorchLocator.ProbePython(TimeSpan.FromSeconds(30));
        Assert.False(string.IsNullOrWhiteSpace(p.Note));
        if (p.PackageDir is not null) Assert.True(Directory.Exists(p.PackageDir));
    }

    [Fact]
    public void TheCudaRuntimeIsFoundInTheProcessMaps()
    {
        string[] maps =
        [
            "7f00-7f10 r-xp 00000000 08:01 123 /usr/lib/x86_64-linux-gnu/libc.so.6",
            "7f20-7f30 r-xp 00000000 08:01 456 /venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcudart.so.13",
            "7f40-7f50 rw-p 00000000 00:00 0 [heap]",
        ];
        Assert.Equal("/venv/lib/python3.12/site-packages/nvidia/cu13/lib/libcudart.so.13", DeviceMemory.MappedLibrary(maps, "libcudart"));
        Assert.Null(DeviceMemory.MappedLibrary(maps[..1], "libcudart"));
    }
}
