using System.Text;
using System.Text.RegularExpressions;

namespace MoeLora.Sources;

/// <summary>Options of one <see cref="ModelResolver.DownloadAsync"/> call.</summary>
public sealed record DownloadOptions
{
    /// <summary>Branch, tag or commit on the Hub (<c>--revision</c>).</summary>
    public string Revision { get; init; } = "main";

    /// <summary>
    /// <c>--include</c>: fnmatch-style globs (<c>*</c>, <c>?</c>, <c>[abc]</c>; <c>*</c> also crosses <c>/</c>, like
    /// huggingface_hub's <c>allow_patterns</c>). When set, only the standard files (configs, tokenizer, weights) that
    /// match are fetched, and every pattern without a wildcard is fetched as a file name of its own (it must
    /// exist). Null or empty: the standard files.
    /// </summary>
    public IReadOnlyList<string>? Include { get; init; }

    /// <summary>Called after each file is settled (downloaded, found in the cache, or known missing), in order.</summary>
    public Action<DownloadedFile>? OnFile { get; init; }

    public static DownloadOptions Default { get; } = new();
}

/// <summary>What happened to one file of a <see cref="ModelResolver.DownloadAsync"/> call.</summary>
public enum DownloadStatus
{
    /// <summary>Fetched from the Hub now.</summary>
    Downloaded,
    /// <summary>Already in the snapshot folder: no request.</summary>
    Cached,
    /// <summary>Its blob was already in the cache (another revision has it): linked into the snapshot, no bytes fetched.</summary>
    Linked,
    /// <summary>An optional file (e.g. generation_config.json) the model does not have.</summary>
    Missing,
}

/// <summary>One file of a download.</summary>
/// <param name="Path">Its path in the repository, e.g. <c>model-00001-of-00002.safetensors</c>.</param>
/// <param name="Status">Whether it was fetched, already there, or absent.</param>
/// <param name="Size">Its size in bytes (0 when missing).</param>
/// <param name="BytesDownloaded">Bytes received for it in this call (0 unless downloaded).</param>
/// <param name="LocalPath">Its path in <c>snapshots/{commit}/</c>, or null when missing.</param>
public sealed record DownloadedFile(string Path, DownloadStatus Status, long Size, long BytesDownloaded, string? LocalPath);

/// <summary>The result of <see cref="ModelResolver.DownloadAsync"/>: a complete cache snapshot.</summary>
/// <param name="Id">The Hub id.</param>
/// <param name="Revision">The revision asked for.</param>
/// <param name="Commit">The commit it resolved to; every file comes from this commit.</param>
/// <param name="SnapshotFolder"><c>{cache}/models--org--name/snapshots/{commit}</c>, what <see cref="ResolvedModel.Directory"/> will be.</param>
/// <param name="Files">Every file considered, in download order, including optional files that are missing.</param>
/// <param name="Weights">How the weights are stored: <c>model.safetensors</c>, <c>model.safetensors.index.json</c>, or null when none were fetched.</param>
public sealed record DownloadResult(string Id, string Revision, string Commit, string SnapshotFolder,
    IReadOnlyList<DownloadedFile> Files, string? Weights)
{
    /// <summary>Files present in the snapshot after the call.</summary>
    public IEnumerable<DownloadedFile> Present => Files.Where(f => f.Status != DownloadStatus.Missing);

    public long TotalBytes => Present.Sum(f => f.Size);

    public long BytesDownloaded => Files.Sum(f => f.BytesDownloaded);
}

/// <summary>fnmatch-style globs as huggingface_hub's <c>filter_repo_objects</c> applies them.</summary>
internal static class Glob
{
    public static bool HasWildcard(string pattern) => pattern.IndexOfAny(['*', '?', '[']) >= 0;

    public static bool IsMatch(string pattern, string path) => ToRegex(pattern).IsMatch(path);

    public static Regex ToRegex(string pattern)
    {
        // huggingface_hub: a pattern ending in '/' means everything under that folder.
        if (pattern.EndsWith('/')) pattern += "*";
        var regex = new StringBuilder("^");
        for (int i = 0; i < pattern.Length; i++)
        {
            char c = pattern[i];
            switch (c)
            {
                case '*': regex.Append(".*"); break;
                case '?': regex.Append('.'); break;
                case '[':
                    int close = pattern.IndexOf(']', i + 2 <= pattern.Length ? i + 2 : pattern.Length);
                    if (close < 0) { regex.Append(@"\["); break; }
                    string set = pattern[(i + 1)..close];
                    regex.Append('[').Append(set.StartsWith('!') ? "^" + Regex.Escape(set[1..]) : Regex.Escape(set)).Append(']');
                    i = close;
                    break;
                default: regex.Append(Regex.Escape(c.ToString())); break;
            }
        }
        return new Regex(regex.Append('$').ToString(), RegexOptions.CultureInvariant | RegexOptions.Singleline);
    }
}
