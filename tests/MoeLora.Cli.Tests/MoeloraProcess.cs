using System.Diagnostics;

namespace MoeLora.Cli.Tests;

/// <summary>Runs the real <c>moelora</c> executable (built next to the tests) in a hermetic, offline environment.</summary>
internal static class MoeloraProcess
{
    public sealed record Result(int ExitCode, string Stdout, string Stderr);

    public static Result Run(params string[] args) => RunIn(null, args);

    public static Result RunIn(string? workingDirectory, params string[] args) => RunWith(workingDirectory, null, args);

    /// <summary>Like <see cref="RunIn"/>, then sets (or, for null values, removes) the given environment variables.</summary>
    public static Result RunWith(string? workingDirectory, IReadOnlyDictionary<string, string?>? environment, params string[] args)
    {
        using var p = Start(workingDirectory, environment, args);
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEndAsync();
        if (!p.WaitForExit(60_000))
        {
            p.Kill(true);
            throw new TimeoutException("moelora did not finish in 60 s: " + string.Join(' ', args));
        }
        return new Result(p.ExitCode, stdout.Result, stderr.Result);
    }

    /// <summary>Starts moelora with redirected output and returns the running process (for signals).</summary>
    public static Process Start(string? workingDirectory, IReadOnlyDictionary<string, string?>? environment, params string[] args)
    {
        var exe = Path.Combine(AppContext.BaseDirectory, "moelora.dll");
        var psi = new ProcessStartInfo("dotnet")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
            WorkingDirectory = workingDirectory ?? AppContext.BaseDirectory,
        };
        psi.ArgumentList.Add(exe);
        foreach (var a in args) psi.ArgumentList.Add(a);
        // No network, no user cache: the catalog and local folders are the only sources.
        psi.Environment["HF_HUB_OFFLINE"] = "1";
        psi.Environment["HF_HOME"] = Path.Combine(Path.GetTempPath(), "moelora-tests-hf-home");
        psi.Environment.Remove("HF_HUB_CACHE");
        psi.Environment.Remove("HF_TOKEN");
        psi.Environment["NO_COLOR"] = "1";
        psi.Environment.Remove("COLUMNS"); // piped output is 140 columns unless a test sets COLUMNS
        foreach (var (name, value) in environment ?? new Dictionary<string, string?>())
        {
            if (value is null) psi.Environment.Remove(name);
            else psi.Environment[name] = value;
        }
        return Process.Start(psi)!;
    }

    /// <summary>Asserts the contract for bad input: non-zero exit, one line on stderr, no stack trace.</summary>
    public static void AssertCleanError(Result r, int expectedExit, string? contains = null)
    {
        Assert.Equal(expectedExit, r.ExitCode);
        var lines = r.Stderr.Split('\n', StringSplitOptions.RemoveEmptyEntries);
        Assert.Single(lines);
        Assert.StartsWith("moelora: error: ", lines[0]);
        Assert.DoesNotContain("   at ", r.Stderr);
        Assert.DoesNotContain("Exception", r.Stderr);
        if (contains is not null) Assert.Contains(contains, lines[0]);
    }
}
