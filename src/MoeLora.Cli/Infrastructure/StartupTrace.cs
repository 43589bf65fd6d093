using System.Diagnostics;
using System.Globalization;

namespace MoeLora.Cli.Infrastructure;

/// <summary>
/// <c>MOELORA_TRACE_STARTUP=1</c>: one stderr line per phase of a run (milliseconds since <c>Main</c> started, and
/// managed bytes allocated so far), to see where a cold start goes (BENCHMARKS.md); the time before <c>Main</c> is the
/// wall time of the run less the last line's. Off, it costs one environment read.
/// </summary>
public static class StartupTrace
{
    private static readonly bool Enabled = Environment.GetEnvironmentVariable("MOELORA_TRACE_STARTUP") == "1";
    private static readonly long Start = Stopwatch.GetTimestamp();

    public static void Mark(string phase)
    {
        if (!Enabled) return;
        var sinceMain = Stopwatch.GetElapsedTime(Start);
        Console.Error.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"[startup] {sinceMain.TotalMilliseconds,7:F2} ms  {GC.GetTotalAllocatedBytes() / 1e6,6:F2} MB allocated  {GC.CollectionCount(0)} gen0 GCs  {phase}"));
    }
}
