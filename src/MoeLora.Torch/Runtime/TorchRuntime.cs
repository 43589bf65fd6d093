using System.Runtime.InteropServices;
using TorchSharp;

namespace MoeLora.Torch.Runtime;

/// <summary>
/// Start-up for TorchSharp. Call <see cref="EnsureInitialized"/> before touching any TorchSharp type: on Linux it
/// patches <c>libLibTorchSharp.so</c> (see <see cref="LibTorchSharpElfPatch"/>) before TorchSharp loads it, so a fresh
/// Debian 12 machine needs no manual step. The build copies the original file into bin/ again on every build, which
/// is why this runs at start-up rather than once.
/// </summary>
public static class TorchRuntime
{
    const string LibraryFile = "libLibTorchSharp.so";
    static readonly Lock Gate = new();
    static bool _initialized;
    static string? _redirectedPath;

    /// <summary>Where the patched library came from (for diagnostics): in-place, a cached copy, or nothing to do.</summary>
    public static string Status { get; private set; } = "not initialized";

    public static void EnsureInitialized()
    {
        lock (Gate)
        {
            if (_initialized) return;
            if (RuntimeInformation.IsOSPlatform(OSPlatform.Linux) && RuntimeInformation.ProcessArchitecture == Architecture.X64)
                PatchLinuxLibrary();
            else
                Status = "no patch needed on this OS";
            // Forces the native load now, so a failure surfaces here with TorchSharp's own trace.
            torch.InitializeDeviceType(DeviceType.CPU);
            _initialized = true;
        }
    }

    static void PatchLinuxLibrary()
    {
        var candidates = CandidatePaths().Where(File.Exists).Distinct().ToList();
        if (candidates.Count == 0)
        {
            Status = $"{LibraryFile} not found next to the application; TorchSharp will search on its own";
            return;
        }
        var notes = new List<string>();
        foreach (var path in candidates)
        {
            var bytes = File.ReadAllBytes(path);
            var result = LibTorchSharpElfPatch.Patch(bytes);
            if (result != LibTorchSharpElfPatch.Result.Patched) { notes.Add($"{path}: {result}"); continue; }
            if (TryReplaceAtomically(path, bytes)) { notes.Add($"{path}: patched in place"); continue; }
            // Read-only install: load a patched copy instead and route TorchSharp's imports to it.
            var copy = WriteCachedCopy(bytes);
            RedirectTo(copy);
            notes.Add($"{path}: read-only, using patched copy {copy}");
        }
        Status = string.Join("; ", notes);
    }

    static IEnumerable<string> CandidatePaths()
    {
        var baseDir = AppContext.BaseDirectory;
        yield return Path.Combine(baseDir, "runtimes", "linux-x64", "native", LibraryFile);
        yield return Path.Combine(baseDir, LibraryFile); // RID-specific publish puts natives beside the app
        // Framework-dependent apps may resolve natives from the directories the host lists (e.g. the NuGet cache).
        if (AppContext.GetData("NATIVE_DLL_SEARCH_DIRECTORIES") is string dirs)
            foreach (var d in dirs.Split(Path.PathSeparator, StringSplitOptions.RemoveEmptyEntries))
                yield return Path.Combine(d, LibraryFile);
    }

    static bool TryReplaceAtomically(string path, byte[] bytes)
    {
        var tmp = $"{path}.{Environment.ProcessId}.tmp";
        try
        {
            File.WriteAllBytes(tmp, bytes);
            // rename(2) is atomic: a concurrent process sees either the old or the patched file, never a torn one.
            File.Move(tmp, path, overwrite: true);
            return true;
        }
        catch (Exception e) when (e is UnauthorizedAccessException or IOException)
        {
            try { File.Delete(tmp); } catch (Exception) { /* best effort */ }
            return false;
        }
    }

    static string WriteCachedCopy(byte[] bytes)
    {
        var hash = Convert.ToHexString(System.Security.Cryptography.SHA256.HashData(bytes))[..16];
        var dir = Path.Combine(Path.GetTempPath(), "moelora-native", hash);
        Directory.CreateDirectory(dir);
        var path = Path.Combine(dir, LibraryFile);
        if (!File.Exists(path)) { var tmp = path + $".{Environment.ProcessId}.tmp"; File.WriteAllBytes(tmp, bytes); File.Move(tmp, path, true); }
        return path;
    }

    static void RedirectTo(string patched)
    {
        if (_redirectedPath is not null) return;
        _redirectedPath = patched;
        // libtorch itself must already be resolvable: load torch_cpu from the app first, then the patched copy.
        NativeLibrary.SetDllImportResolver(typeof(torch).Assembly, (name, asm, search) =>
            name == "LibTorchSharp" ? NativeLibrary.Load(patched) : IntPtr.Zero);
    }

    /// <summary>Version info for reports.</summary>
    public static string Describe() =>
        $"TorchSharp {typeof(torch).Assembly.GetName().Version}, libtorch {torch.__version__}, CUDA available: {torch.cuda.is_available()}";

}
