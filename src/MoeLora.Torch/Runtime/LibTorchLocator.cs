using System.Diagnostics;
using System.Text.RegularExpressions;

namespace MoeLora.Torch.Runtime;

/// <summary>Where a libtorch came from.</summary>
public enum LibTorchSource
{
    /// <summary>Next to the application (TorchSharp's libtorch packages); TorchSharp loads it itself.</summary>
    Bundled,
    /// <summary>The folder named by <c>MOELORA_LIBTORCH</c>.</summary>
    Environment,
    /// <summary>The <c>torch/lib</c> folder of the PyTorch that <c>python3</c> on the PATH imports.</summary>
    Python,
}

/// <summary>One libtorch to run against.</summary>
/// <param name="Preload">Absolute paths to load, in dependency order, before TorchSharp's LibTorchSharp (empty for a bundled libtorch).</param>
public sealed record LibTorchChoice(LibTorchSource Source, string Directory, bool HasCuda, string? Version, IReadOnlyList<string> Preload)
{
    public string Describe() => Source switch
    {
        LibTorchSource.Bundled => $"libtorch bundled with the application ({Directory}{(HasCuda ? ", CUDA" : ", CPU only")})",
        LibTorchSource.Environment => $"libtorch from MOELORA_LIBTORCH ({Directory}{VersionText}{(HasCuda ? ", CUDA" : ", CPU only")})",
        _ => $"libtorch of python3's PyTorch ({Directory}{VersionText}{(HasCuda ? ", CUDA" : ", CPU only")})",
    };

    string VersionText => Version is null ? "" : $", torch {Version}";
}

/// <summary>The libtorch to use, and why CUDA cannot be had when it cannot (null when it can or was not asked for).</summary>
public sealed record LibTorchSearch(LibTorchChoice? Choice, string? CudaUnavailableReason, string? NoLibTorchReason = null);

/// <summary>What <c>python3</c> said about its torch package: the package folder, or why there is none.</summary>
public sealed record PythonTorch(string? PackageDir, string Note);

/// <summary>
/// Finds a libtorch for TorchSharp. A CUDA request takes, in order: <c>MOELORA_LIBTORCH</c> (explicit wins), TorchSharp's
/// CUDA libtorch next to the application, the <c>torch/lib</c> of the PyTorch that <c>python3</c> imports. A CPU run
/// takes <c>MOELORA_LIBTORCH</c>, then the bundled libtorch, then python3's. Pure apart from the injected probes, so the
/// rules are tested with fake folders.
/// </summary>
public static class LibTorchLocator
{
    public const string EnvironmentVariable = "MOELORA_LIBTORCH";

    /// <summary>libtorch's shared objects in dependency order (each needs only earlier ones, besides system and CUDA libraries).</summary>
    public static readonly IReadOnlyList<string> LoadOrder =
        ["libc10.so", "libtorch_cpu.so", "libc10_cuda.so", "libtorch_cuda.so", "libtorch.so"];

    const string CpuMarker = "libtorch_cpu.so", CudaMarker = "libtorch_cuda.so";

    public static LibTorchSearch Locate(bool wantCuda, IEnumerable<string> bundledDirs, string? environment, Func<PythonTorch> python)
    {
        var dirs = bundledDirs.Where(Directory.Exists).Distinct().ToList();
        var bundled = dirs.FirstOrDefault(d => File.Exists(Path.Combine(d, CpuMarker)));
        var bundledCuda = dirs.FirstOrDefault(d => File.Exists(Path.Combine(d, CudaMarker)));

        if (!string.IsNullOrWhiteSpace(environment))
        {
            var dir = LibDir(environment.Trim()) ?? throw new LibTorchException(
                $"{EnvironmentVariable}={environment}: no {CpuMarker} there or in its lib/ folder (point it at a PyTorch install's torch/lib)");
            if (bundled is not null && !SameDir(bundled, dir))
                throw new LibTorchException($"{EnvironmentVariable}={environment}: {BundledConflict(bundled)}");
            var choice = External(LibTorchSource.Environment, dir);
            return new LibTorchSearch(choice, wantCuda && !choice.HasCuda
                ? $"{EnvironmentVariable} points at {dir}, a libtorch without CUDA (no {CudaMarker})" : null);
        }

        if (wantCuda && bundledCuda is not null)
            return new LibTorchSearch(new LibTorchChoice(LibTorchSource.Bundled, bundledCuda, true, null, []), null);

        PythonTorch? py = null;
        LibTorchChoice? pythonChoice = null;
        if (wantCuda || bundled is null)
        {
            py = python();
            if (py.PackageDir is not null && LibDir(py.PackageDir) is { } lib) pythonChoice = External(LibTorchSource.Python, lib);
        }
        if (wantCuda && pythonChoice is { HasCuda: true })
        {
            if (bundled is null) return new LibTorchSearch(pythonChoice, null);
            return new LibTorchSearch(new LibTorchChoice(LibTorchSource.Bundled, bundled, false, null, []),
                $"python3's CUDA torch at {pythonChoice.Directory} cannot be used: {BundledConflict(bundled)}");
        }

        string? reason = null;
        if (wantCuda)
        {
            var pyNote = pythonChoice is not null
                ? $"python3's torch at {pythonChoice.Directory} has no CUDA (no {CudaMarker}{(pythonChoice.Version is { } v ? $"; torch {v}" : "")})"
                : $"python3 {py!.Note}";
            reason = $"no CUDA libtorch found: {(bundled is null ? "no libtorch is bundled with the application" : "the application bundles the CPU-only libtorch")}, " +
                $"{EnvironmentVariable} is unset, and {pyNote}";
        }
        if (bundled is not null) return new LibTorchSearch(new LibTorchChoice(LibTorchSource.Bundled, bundled, false, null, []), reason);
        if (pythonChoice is not null) return new LibTorchSearch(pythonChoice, reason);
        return new LibTorchSearch(null, reason,
            $"no libtorch found: none is bundled with the application, {EnvironmentVariable} is unset, and python3 {py!.Note}; " +
            $"install PyTorch for python3, set {EnvironmentVariable} to a torch/lib folder, or build with the libtorch package");
    }

    /// <summary>
    /// TorchSharp probes for libtorch_cpu.so next to the application on its own (in its static constructor), so an
    /// installed libtorch can only be used by a build that does not bundle one: two libtorch copies in one process abort.
    /// </summary>
    static string BundledConflict(string bundled) =>
        $"this build bundles the CPU libtorch ({bundled}), which TorchSharp loads by itself; build with -p:MoeLoraCuda=true " +
        "(no bundled libtorch) or use a publish without it (tools/gpu_smoke/pack.sh)";

    static bool SameDir(string a, string b) => string.Equals(Path.GetFullPath(a).TrimEnd('/'), Path.GetFullPath(b).TrimEnd('/'), StringComparison.Ordinal);

    /// <summary>The folder holding libtorch_cpu.so: <paramref name="path"/> itself (torch/lib) or its lib/ (the torch package).</summary>
    public static string? LibDir(string path)
    {
        foreach (var d in new[] { path, Path.Combine(path, "lib") })
            if (File.Exists(Path.Combine(d, CpuMarker))) return Path.GetFullPath(d);
        return null;
    }

    static LibTorchChoice External(LibTorchSource source, string libDir)
    {
        var preload = LoadOrder.Select(f => Path.Combine(libDir, f)).Where(File.Exists).ToList();
        return new LibTorchChoice(source, libDir, File.Exists(Path.Combine(libDir, CudaMarker)), ReadVersion(libDir), preload);
    }

    /// <summary>torch/version.py's <c>__version__</c> next to torch/lib, without importing torch.</summary>
    static string? ReadVersion(string libDir)
    {
        var file = Path.Combine(Path.GetDirectoryName(libDir) ?? libDir, "version.py");
        if (!File.Exists(file)) return null;
        var m = Regex.Match(File.ReadAllText(file), @"^__version__\s*=\s*['""]([^'""]+)['""]", RegexOptions.Multiline);
        return m.Success ? m.Groups[1].Value : null;
    }

    /// <summary>
    /// Asks <c>python3</c> on the PATH where its torch package is, without importing it (importlib's find_spec is fast and
    /// initialises nothing). Never throws; gives up after <paramref name="timeout"/>.
    /// </summary>
    public static PythonTorch ProbePython(TimeSpan timeout)
    {
        const string code = "import importlib.util as u; s = u.find_spec('torch'); print(s.submodule_search_locations[0] if s and s.submodule_search_locations else '')";
        try
        {
            var psi = new ProcessStartInfo("python3") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
            psi.ArgumentList.Add("-c");
            psi.ArgumentList.Add(code);
            using var p = Process.Start(psi);
            if (p is null) return new PythonTorch(null, "could not be started");
            var stdout = p.StandardOutput.ReadToEndAsync();
            var stderr = p.StandardError.ReadToEndAsync();
            if (!p.WaitForExit(timeout))
            {
                try { p.Kill(); } catch (InvalidOperationException) { /* already gone */ }
                return new PythonTorch(null, $"did not answer within {timeout.TotalSeconds:0} s");
            }
            var dir = stdout.Result.Trim();
            if (p.ExitCode != 0) return new PythonTorch(null, $"failed ({FirstLine(stderr.Result)})");
            return dir.Length == 0 ? new PythonTorch(null, "has no torch package") : new PythonTorch(dir, $"imports torch from {dir}");
        }
        catch (System.ComponentModel.Win32Exception)
        {
            return new PythonTorch(null, "was not found on the PATH");
        }
    }

    static string FirstLine(string s) => s.Split('\n', StringSplitOptions.RemoveEmptyEntries).LastOrDefault()?.Trim() ?? "no message";
}

/// <summary>A libtorch that was asked for but cannot be used; the message is one line.</summary>
public sealed class LibTorchException(string message) : MoeLora.Core.UserInputException(message);
