using System.Text.RegularExpressions;

namespace MoeLora.Sources.Cache;

/// <summary>
/// The huggingface_hub cache layout, read and written exactly as the Python library does so that either tool
/// reuses the other's downloads:
/// <code>
/// models--{org}--{name}/
///   blobs/{etag}                 file content, named by the git sha1 or LFS sha256
///   refs/{revision}              the 40-hex commit a branch or tag pointed to (refs/pr/1 nests)
///   snapshots/{commit}/{path}    relative symlink to ../../blobs/{etag} (a copy when links are unavailable)
///   .no_exist/{commit}/{path}    empty marker: the file is known not to exist at that commit
/// </code>
/// Every write is atomic (temporary name, then rename), so a reader never sees a partial file.
/// </summary>
public sealed partial class HubCache(string root, bool disableSymlinks = false)
{
    public string Root => root;

    public string RepoFolder(RepoId repo) => Path.Combine(root, repo.CacheFolderName);

    /// <summary>Finds the commit a revision points to: the revision itself if it is a commit hash, else <c>refs/{revision}</c>.</summary>
    public bool TryResolveCommit(RepoId repo, string revision, out string commit)
    {
        commit = "";
        if (IsCommitHash(revision))
        {
            commit = revision;
            return true;
        }
        if (!IsSafeRevision(revision)) return false;
        string refPath = Path.Combine(RepoFolder(repo), "refs", revision);
        if (!File.Exists(refPath)) return false;
        string text = File.ReadAllText(refPath).Trim();
        if (!IsCommitHash(text)) return false;
        commit = text;
        return true;
    }

    /// <summary>The cached file for a revision, or null. Follows the same steps as huggingface_hub's offline lookup.</summary>
    public string? TryFindFile(RepoId repo, string revision, string path, out string? commit)
    {
        commit = null;
        if (!TryResolveCommit(repo, revision, out string resolved)) return null;
        commit = resolved;
        string file = SnapshotPath(repo, resolved, path);
        return File.Exists(file) ? file : null;
    }

    public string SnapshotFolder(RepoId repo, string commit) => Path.Combine(RepoFolder(repo), "snapshots", commit);

    /// <summary>True when a <c>.no_exist</c> marker says the file is absent at that commit.</summary>
    public bool IsKnownMissing(RepoId repo, string commit, string path) =>
        File.Exists(Path.Combine(RepoFolder(repo), ".no_exist", commit, path));

    /// <summary>
    /// Stores a downloaded file: the body goes to a unique <c>.incomplete</c> file next to the blob and is renamed
    /// into place only once <paramref name="writeBody"/> returns; then the snapshot entry and the ref are written.
    /// </summary>
    /// <returns>The path of the file inside <c>snapshots/{commit}/</c>.</returns>
    public async Task<string> StoreAsync(RepoId repo, string revision, string commit, string etag, string path, Func<Stream, Task> writeBody)
    {
        if (!IsCommitHash(commit) || !IsSafeBlobName(etag) || !IsSafeRelativePath(path))
            throw new ModelSourceException($"the Hub sent commit '{commit}' and etag '{etag}' for {repo}/{path}, which cannot name files in the cache.");

        string blobs = Path.Combine(RepoFolder(repo), "blobs");
        Directory.CreateDirectory(blobs);
        string blob = Path.Combine(blobs, etag);
        if (!File.Exists(blob))
        {
            // A unique name: a huggingface_hub process may be writing {etag}.incomplete for the same blob right now.
            string partial = $"{blob}.{Environment.ProcessId}-{Guid.NewGuid():N}.incomplete";
            try
            {
                await using (var stream = new FileStream(partial, FileMode.CreateNew, FileAccess.Write, FileShare.None))
                    await writeBody(stream);
                File.Move(partial, blob, overwrite: true);
            }
            finally
            {
                if (File.Exists(partial)) File.Delete(partial);
            }
        }

        string snapshotFile = SnapshotPath(repo, commit, path);
        Directory.CreateDirectory(Path.GetDirectoryName(snapshotFile)!);
        LinkOrCopy(blob, snapshotFile, path);
        WriteRef(repo, revision, commit);
        return snapshotFile;
    }

    /// <summary>True when <c>blobs/{etag}</c> is complete on disk (blobs only ever appear complete).</summary>
    public bool HasBlob(RepoId repo, string etag) =>
        IsSafeBlobName(etag) && File.Exists(Path.Combine(RepoFolder(repo), "blobs", etag));

    /// <summary>The file of a snapshot, whether or not it exists.</summary>
    public string SnapshotFile(RepoId repo, string commit, string path) => SnapshotPath(repo, commit, path);

    /// <summary>Records that a file does not exist at a commit (an empty <c>.no_exist</c> marker).</summary>
    public void MarkMissing(RepoId repo, string commit, string path)
    {
        if (!IsCommitHash(commit) || !IsSafeRelativePath(path)) return;
        string marker = Path.Combine(RepoFolder(repo), ".no_exist", commit, path);
        Directory.CreateDirectory(Path.GetDirectoryName(marker)!);
        if (!File.Exists(marker)) AtomicFile.WriteAllText(marker, "");
    }

    /// <summary>Points <c>refs/{revision}</c> at a commit, unless the revision is itself a commit.</summary>
    public void WriteRef(RepoId repo, string revision, string commit)
    {
        if (revision == commit || !IsSafeRevision(revision)) return;
        string refPath = Path.Combine(RepoFolder(repo), "refs", revision);
        if (File.Exists(refPath) && File.ReadAllText(refPath) == commit) return;
        Directory.CreateDirectory(Path.GetDirectoryName(refPath)!);
        // huggingface_hub writes the bare hash with no newline.
        AtomicFile.WriteAllText(refPath, commit);
    }

    private string SnapshotPath(RepoId repo, string commit, string path) =>
        Path.Combine(SnapshotFolder(repo, commit), path.Replace('/', Path.DirectorySeparatorChar));

    private void LinkOrCopy(string blob, string snapshotFile, string path)
    {
        string temporary = $"{snapshotFile}.{Guid.NewGuid():N}.tmp";
        try
        {
            if (!disableSymlinks)
            {
                // Relative like huggingface_hub's: ../../blobs/{etag}, one more ../ per folder level of the path.
                string up = string.Concat(Enumerable.Repeat("../", 2 + path.Count(c => c == '/')));
                try
                {
                    File.CreateSymbolicLink(temporary, up + "blobs/" + Path.GetFileName(blob));
                    File.Move(temporary, snapshotFile, overwrite: true);
                    return;
                }
                catch (Exception ex) when (ex is IOException or UnauthorizedAccessException or PlatformNotSupportedException)
                {
                    // No symlink rights (Windows without developer mode, some mounts): fall back to a copy.
                    if (File.Exists(temporary)) File.Delete(temporary);
                }
            }
            File.Copy(blob, temporary, overwrite: true);
            File.Move(temporary, snapshotFile, overwrite: true);
        }
        finally
        {
            if (File.Exists(temporary)) File.Delete(temporary);
        }
    }

    public static bool IsCommitHash(string text) => CommitHash().IsMatch(text);

    // Revisions become paths under refs/: branch names may contain '/', never '..' or a leading '/'.
    internal static bool IsSafeRevision(string revision) => IsSafeRelativePath(revision);

    internal static bool IsSafeRelativePath(string path) =>
        path.Length > 0 && !path.StartsWith('/') && !path.Contains('\\', StringComparison.Ordinal)
        && path.Split('/').All(part => part.Length > 0 && part != "." && part != "..");

    private static bool IsSafeBlobName(string etag) => BlobName().IsMatch(etag);

    [GeneratedRegex("^[0-9a-f]{40}$")]
    private static partial Regex CommitHash();

    [GeneratedRegex("^[A-Za-z0-9._-]{1,128}$")]
    private static partial Regex BlobName();
}
