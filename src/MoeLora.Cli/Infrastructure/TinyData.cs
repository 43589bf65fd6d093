using System.Security.Cryptography;

namespace MoeLora.Cli.Infrastructure;

/// <summary>
/// The tiny preset's JSONL files ship inside the tool (embedded from data/tiny), so <c>train --preset tiny</c> and
/// <c>eval --preset tiny</c> work from any folder. The data loaders read paths, so a file is written once to a folder
/// named after its content hash under the temp directory (a changed file gets a new folder; nothing is overwritten).
/// </summary>
public static class TinyData
{
    const string Prefix = "data/tiny/";

    /// <summary>The files the tool carries (cb_train.jsonl, retain_eval.jsonl, ...).</summary>
    public static IReadOnlyList<string> Files =>
        typeof(TinyData).Assembly.GetManifestResourceNames()
            .Where(n => n.StartsWith(Prefix, StringComparison.Ordinal)).Select(n => n[Prefix.Length..]).Order(StringComparer.Ordinal).ToList();

    /// <summary>The embedded copy of <paramref name="file"/> as text (plan folders carry it as stand-in data).</summary>
    public static string Text(string file) => new System.Text.UTF8Encoding(false).GetString(Bytes(file));

    static byte[] Bytes(string file)
    {
        using var stream = typeof(TinyData).Assembly.GetManifestResourceStream(Prefix + file)
            ?? throw new InvalidOperationException($"the tool carries no {Prefix}{file} (build error: data/tiny is embedded by MoeLora.Cli.csproj)");
        var bytes = new byte[stream.Length];
        stream.ReadExactly(bytes);
        return bytes;
    }

    /// <summary>A readable path holding the embedded copy of <paramref name="file"/>.</summary>
    public static string PathOf(string file)
    {
        var bytes = Bytes(file);
        var hash = Convert.ToHexStringLower(SHA256.HashData(bytes))[..16];
        var dir = Path.Combine(Path.GetTempPath(), $"moelora-{Environment.UserName}", "tiny-" + hash);
        var path = Path.Combine(dir, file);
        if (File.Exists(path) && new FileInfo(path).Length == bytes.Length) return path;
        Directory.CreateDirectory(dir);
        AtomicFile.Write(path, tmp => File.WriteAllBytes(tmp, bytes));
        return path;
    }
}
