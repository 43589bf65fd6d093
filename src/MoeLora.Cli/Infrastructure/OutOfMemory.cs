namespace MoeLora.Cli.Infrastructure;

/// <summary>libtorch's allocator failures ("CUDA out of memory", "DefaultCPUAllocator: not enough memory"): a resource
/// limit, not a bug, reported in one line.</summary>
internal static class OutOfMemory
{
    public static bool Is(Exception e) =>
        e is System.Runtime.InteropServices.ExternalException or OutOfMemoryException &&
        (e.Message.Contains("out of memory", StringComparison.OrdinalIgnoreCase) || e.Message.Contains("not enough memory", StringComparison.OrdinalIgnoreCase));

    /// <summary>
    /// The first sentence(s) of libtorch's message (what was asked for and what was free), without its allocator
    /// advice and the page of C++ frames that follows.
    /// </summary>
    public static string Summary(Exception e)
    {
        var first = e.Message.Split('\n')[0].Trim();
        int cut = first.IndexOf(" If reserved but unallocated", StringComparison.Ordinal);
        return cut > 0 ? first[..cut] : first;
    }
}
