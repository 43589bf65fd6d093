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
    static IntPtr _libTorchSharp;
    static bool _resolverSet;
    static LibTorchSearch? _search;

    /// <summary>Where the patched library came from (for diagnostics): in-place, a cached copy, or nothing to do.</summary>
    public static string Status { get; private set; } = "not initialized";

    /// <summary>The libtorch TorchSharp runs against (null before initialisation or off Linux).</summary>
    public static LibTorchChoice? LibTorch => _search?.Choice;

    /// <summary>One line naming the libtorch in use, e.g. for <c>--device cuda</c> runs.</summary>
    public static string LibTorchDescription => LibTorch?.Describe() ?? "libtorch found by TorchSharp's own search";

    /// <summary>Initialises for CPU use (a CUDA libtorch found on the way is kept; see <see cref="EnsureInitialized(bool)"/>).</summary>
    public static void EnsureInitialized() => EnsureInitialized(wantCuda: false);

    /// <summary>
    /// Picks a libtorch (<see cref="LibTorchLocator"/>) and loads it before TorchSharp initialises. With
    /// <paramref name="wantCuda"/> a CUDA libtorch is preferred: TorchSharp's CUDA package next to the application, else
    /// an installed PyTorch's <c>torch/lib</c> (<c>MOELORA_LIBTORCH</c> or <c>python3</c>'s). Only the first call
    /// chooses: libtorch cannot be swapped once loaded, so select the device before anything else touches TorchSharp.
    /// </summary>
    public static void EnsureInitialized(bool wantCuda)
    {
        lock (Gate)
        {
            if (_initialized) return;
            bool linux = RuntimeInformation.IsOSPlatform(OSPlatform.Linux) && RuntimeInformation.ProcessArchitecture == Architecture.X64;
            if (linux)
            {
                PatchLinuxLibrary();
                _search = LibTorchLocator.Locate(wantCuda, NativeDirectories(),
                    Environment.GetEnvironmentVariable(LibTorchLocator.EnvironmentVariable), () => LibTorchLocator.ProbePython(PythonTimeout));
                if (_search.Choice is null) throw new LibTorchException(_search.NoLibTorchReason!);
                if (_search.Choice.HasCuda) DefaultCudaAllocator();
                if (_search.Choice.Preload.Count > 0) LoadExternal(_search.Choice);
            }
            else
                Status = "no patch needed on this OS";
            // Forces the native load now, so a failure surfaces here with TorchSharp's own trace.
            torch.InitializeDeviceType(DeviceType.CPU);
            _initialized = true;
        }
    }

    static readonly TimeSpan PythonTimeout = TimeSpan.FromSeconds(20);

    /// <summary>The CUDA caching allocator's settings variable, read once by libtorch when it first allocates.</summary>
    public const string CudaAllocatorVariable = "PYTORCH_CUDA_ALLOC_CONF";

    /// <summary>
    /// Turns on the CUDA caching allocator's expandable segments unless the user set <c>PYTORCH_CUDA_ALLOC_CONF</c>.
    /// A real-size run fills the card with a few huge weights and many short-lived activations of changing shapes;
    /// fixed segments fragment (blocks cached for the report's hidden-state forward cannot serve the step's larger
    /// ones), and TorchSharp 0.107 has no <c>empty_cache</c> to hand them back. The variable must be in the native
    /// environment before libtorch loads: .NET's <see cref="Environment.SetEnvironmentVariable(string, string)"/> only
    /// changes the managed copy on Linux, hence libc's <c>setenv</c>.
    /// </summary>
    static void DefaultCudaAllocator()
    {
        if (!string.IsNullOrEmpty(Environment.GetEnvironmentVariable(CudaAllocatorVariable))) return;
        if (setenv(CudaAllocatorVariable, "expandable_segments:True", 0) == 0)
            Environment.SetEnvironmentVariable(CudaAllocatorVariable, "expandable_segments:True");
    }

    [DllImport("libc", EntryPoint = "setenv")]
    static extern int setenv([MarshalAs(UnmanagedType.LPUTF8Str)] string name, [MarshalAs(UnmanagedType.LPUTF8Str)] string value, int overwrite);

    /// <summary>
    /// Why <c>--device cuda</c> cannot run, in one line (null when a CUDA libtorch is loaded). When TorchSharp was
    /// initialised for the CPU first, the search is repeated to say what a CUDA request would have found.
    /// </summary>
    public static string? CudaUnavailableReason()
    {
        if (LibTorch is { HasCuda: true }) return null;
        if (_search?.CudaUnavailableReason is { } r) return r;
        if (!RuntimeInformation.IsOSPlatform(OSPlatform.Linux)) return "MoeLora finds CUDA libtorch only on Linux x64; reference a TorchSharp CUDA package";
        LibTorchSearch again;
        try
        {
            again = LibTorchLocator.Locate(true, NativeDirectories(), Environment.GetEnvironmentVariable(LibTorchLocator.EnvironmentVariable),
                () => LibTorchLocator.ProbePython(PythonTimeout));
        }
        catch (LibTorchException e) { return e.Message; }
        return again.CudaUnavailableReason
            ?? $"TorchSharp was already initialised with the {LibTorchDescription} before CUDA was requested ({again.Choice!.Describe()} would be used); " +
               "select the device first";
    }

    /// <summary>
    /// Loads an installed libtorch by absolute path in dependency order, then TorchSharp's LibTorchSharp, whose
    /// <c>DT_NEEDED</c> entries (libtorch.so, libc10.so, libtorch_cpu.so) the dynamic loader then matches by soname
    /// to the objects already loaded, so <c>LD_LIBRARY_PATH</c> is not needed. Each libtorch file finds its own
    /// dependencies (libgomp, CUDA's pip libraries) through its RUNPATH. TorchSharp's own probing (its static
    /// constructor, before any flag could be set) then finds no libtorch_cpu.so next to the application: the locator
    /// never picks an installed libtorch while one is bundled (two copies in one process abort in c10's dispatcher).
    /// </summary>
    static void LoadExternal(LibTorchChoice choice)
    {
        foreach (var file in choice.Preload)
        {
            try { NativeLibrary.Load(file); }
            catch (DllNotFoundException e)
            {
                throw new LibTorchException($"cannot load {file} ({choice.Describe()}): {OneLine(e.Message)}");
            }
        }
        var own = _redirectedPath ?? CandidatePaths().FirstOrDefault(File.Exists)
            ?? throw new LibTorchException($"{LibraryFile} is not next to the application; TorchSharp's native library is needed with {choice.Describe()}");
        try { _libTorchSharp = NativeLibrary.Load(own); }
        catch (DllNotFoundException e)
        {
            throw new LibTorchException($"TorchSharp's {LibraryFile} does not load against {choice.Describe()}: {OneLine(e.Message)}");
        }
        SetResolver();
    }

    static string OneLine(string s) => string.Join(" ", s.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));

    /// <summary>TorchSharp's LibTorchSharp as loaded for this process (for direct exports such as THSStorage_data_ptr).</summary>
    internal static IntPtr LibTorchSharpHandle()
    {
        EnsureInitialized();
        if (_libTorchSharp == IntPtr.Zero)
            _libTorchSharp = _redirectedPath is not null ? NativeLibrary.Load(_redirectedPath) : NativeLibrary.Load("LibTorchSharp", typeof(torch).Assembly, null);
        return _libTorchSharp;
    }

    static IEnumerable<string> NativeDirectories() =>
        CandidatePaths().Select(p => Path.GetDirectoryName(p)!).Distinct();

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
        SetResolver();
    }

    /// <summary>Routes TorchSharp's <c>LibTorchSharp</c> imports to the library loaded here (only one resolver per assembly).</summary>
    static void SetResolver()
    {
        if (_resolverSet) return;
        _resolverSet = true;
        NativeLibrary.SetDllImportResolver(typeof(torch).Assembly, (name, asm, search) =>
        {
            if (name != "LibTorchSharp") return IntPtr.Zero;
            if (_libTorchSharp == IntPtr.Zero && _redirectedPath is not null) _libTorchSharp = NativeLibrary.Load(_redirectedPath);
            return _libTorchSharp;
        });
    }

    /// <summary>Version info for reports.</summary>
    public static string Describe() =>
        $"TorchSharp {typeof(torch).Assembly.GetName().Version} (built for libtorch {torch.__version__}), {LibTorchDescription}, CUDA available: {torch.cuda.is_available()}";

}
