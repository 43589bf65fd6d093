using System.Runtime.InteropServices;
using TorchSharp;

namespace MoeLora.Torch.Runtime;

/// <summary>
/// Operators TorchSharp 0.107 does not bind (<c>torch._grouped_mm</c>, SDPA's <c>scale</c> and <c>enable_gqa</c>, the
/// <c>_foreach_*</c> family), reached through a TorchScript compilation unit: TorchScript calls them through the
/// dispatcher like any other operator, so autograd and the device kernels are libtorch's own.
/// </summary>
internal static class TorchScriptUnit
{
    /// <summary>
    /// <paramref name="source"/> compiled on first use, or null where this libtorch cannot compile it (an operator or
    /// argument it lacks) or the environment variable <paramref name="disableVariable"/> is "0"; callers then keep to
    /// their TorchSharp path.
    /// </summary>
    public static Lazy<torch.jit.CompilationUnit?> Lazy(string source, string? disableVariable = null) => new(() =>
    {
        if (disableVariable is not null && Environment.GetEnvironmentVariable(disableVariable) == "0") return null;
        // TorchScript's parser wants LF line ends and a final newline.
        try { return torch.jit.compile(source.Replace("\r\n", "\n").TrimEnd('\n') + "\n"); }
        catch (Exception e) when (e is ExternalException or InvalidOperationException or ArgumentException) { return null; }
    });
}
