using System.Text;

namespace MoeLora.Cli.Tests.Support;

/// <summary>
/// Golden files (snapshot tests) kept in <c>tests/MoeLora.Cli.Tests/Snapshots</c> and reviewed like code. A test
/// that differs writes <c>NAME.received.EXT</c> next to the golden file and fails with the first differing line;
/// to accept every new output after reviewing it, run the tests with <c>MOELORA_ACCEPT=1</c>, which rewrites the
/// golden files (then look at <c>git diff</c>).
/// </summary>
internal static class Golden
{
    public static bool Accepting => Environment.GetEnvironmentVariable("MOELORA_ACCEPT") == "1";

    /// <summary>The Snapshots folder of this test project's sources (found from the test binaries upwards).</summary>
    public static string Folder { get; } = FindFolder();

    public static void Verify(string name, string actual)
    {
        actual = actual.Replace("\r\n", "\n", StringComparison.Ordinal);
        var path = Path.Combine(Folder, name);
        var received = Path.Combine(Folder, Path.GetFileNameWithoutExtension(name) + ".received" + Path.GetExtension(name));
        if (Accepting)
        {
            File.WriteAllText(path, actual, new UTF8Encoding(false));
            File.Delete(received);
            return;
        }
        if (!File.Exists(path))
        {
            File.WriteAllText(received, actual, new UTF8Encoding(false));
            Assert.Fail($"no golden file {name}; the output is in {received}. Review it and run with MOELORA_ACCEPT=1 to accept.");
        }
        var expected = File.ReadAllText(path).Replace("\r\n", "\n", StringComparison.Ordinal);
        if (expected == actual)
        {
            File.Delete(received);
            return;
        }
        File.WriteAllText(received, actual, new UTF8Encoding(false));
        var e = expected.Split('\n');
        var a = actual.Split('\n');
        var line = Enumerable.Range(0, Math.Min(e.Length, a.Length)).FirstOrDefault(i => e[i] != a[i], Math.Min(e.Length, a.Length));
        Assert.Fail($"{name} differs from its golden file at line {line + 1}:\n  expected: {Line(e, line)}\n  actual:   {Line(a, line)}\n" +
            $"The output is in {received}; if the change is intended, run with MOELORA_ACCEPT=1 to accept it.");
    }

    private static string Line(string[] lines, int i) => i < lines.Length ? lines[i] : "(end of file)";

    private static string FindFolder()
    {
        for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            if (File.Exists(Path.Combine(dir.FullName, "MoeLora.Cli.Tests.csproj")))
                return Path.Combine(dir.FullName, "Snapshots");
        throw new InvalidOperationException($"the MoeLora.Cli.Tests sources are not above {AppContext.BaseDirectory}");
    }
}
