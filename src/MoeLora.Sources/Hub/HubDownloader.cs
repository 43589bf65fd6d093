using System.Text;
using MoeLora.Sources.Cache;
using MoeLora.Sources.Progress;

namespace MoeLora.Sources.Hub;

/// <summary>A text file fetched from the Hub.</summary>
/// <param name="CachedPath">Its path in <c>snapshots/</c>, or null when the server's answer could not be cached.</param>
/// <param name="Note">Why it was not cached, for the user.</param>
internal sealed record DownloadedText(string Text, string? Commit, string? CachedPath, string? Note);

/// <summary>Downloads whole (small) files from resolve URLs into the hub cache, as <c>hf_hub_download</c> would.</summary>
internal sealed class HubDownloader(HubClient client, HubCache cache, SourceSettings settings)
{
    // Only configs and indexes are downloaded whole; anything bigger kept in memory would be a server bug.
    private const int MaxUncachedBytes = 64 << 20;

    /// <summary>Fetches a file, or returns null when the Hub says the file does not exist (the repo and revision do).</summary>
    public async Task<DownloadedText?> TryDownloadTextAsync(HubFile file, CancellationToken cancellationToken)
    {
        HubResponse response;
        try
        {
            response = await client.GetAsync(file, null, null, cancellationToken);
        }
        catch (HubException ex) when (ex.Kind == HubErrorKind.EntryNotFound)
        {
            if (ex.Commit is not null) cache.MarkMissing(file.Repo, ex.Commit, file.Path);
            return null;
        }

        using (response)
        {
            HubFileMetadata metadata = response.Metadata;
            long? expected = response.Message.Content.Headers.ContentLength;
            using IProgressBar bar = metadata.Size >= settings.ProgressThresholdBytes
                ? settings.Progress.Start($"{file.Repo}: {file.Path}", metadata.Size)
                : NullDownloadProgress.Instance;

            if (metadata.Commit is null || metadata.Etag is null)
            {
                // Without X-Repo-Commit and an ETag the cache entry cannot be named; huggingface_hub refuses such
                // servers, we still use the file but leave the cache alone.
                byte[] bytes = await response.ReadUpToAsync(MaxUncachedBytes, cancellationToken);
                CheckLength(file, bytes.Length, expected);
                return new DownloadedText(Decode(bytes), metadata.Commit, null,
                    $"{client.Endpoint} sent no {(metadata.Commit is null ? "X-Repo-Commit" : "ETag")} for {file.Path}, so it was not stored in the HF cache");
            }

            string path = await cache.StoreAsync(file.Repo, file.Revision, metadata.Commit, metadata.Etag, file.Path, async stream =>
            {
                long copied = await response.CopyToAsync(stream, bar, cancellationToken);
                CheckLength(file, copied, expected);
            });
            return new DownloadedText(await File.ReadAllTextAsync(path, cancellationToken), metadata.Commit, path, null);
        }
    }

    /// <summary>
    /// Streams a file of any size into the cache (never into memory): the body goes to a unique
    /// <c>blobs/{etag}.….incomplete</c>, renamed into place only when complete and, for LFS files, only when its
    /// sha256 matches the etag. Large files get a progress bar. Returns the snapshot path and the bytes received.
    /// </summary>
    public async Task<(string Path, long Bytes)> DownloadToCacheAsync(HubFile file, string commit, CancellationToken cancellationToken)
    {
        using HubResponse response = await client.GetAsync(file, null, null, cancellationToken);
        HubFileMetadata metadata = response.Metadata;
        if (metadata.Etag is null)
            throw new HubException(HubErrorKind.Protocol, $"{client.Endpoint} sent no ETag for {file}, so it cannot be stored in the HF cache.");
        if (metadata.Commit is not null && metadata.Commit != commit)
            throw new HubException(HubErrorKind.Protocol, $"{client.Endpoint} answered {file} with commit {metadata.Commit}, not the {commit} it was asked for.");
        long? expected = response.Message.Content.Headers.ContentLength ?? metadata.Size;
        using IProgressBar bar = (metadata.Size ?? expected) >= settings.ProgressThresholdBytes
            ? settings.Progress.Start($"{file.Repo}: {file.Path}", metadata.Size ?? expected)
            : NullDownloadProgress.Instance;
        // LFS blobs are named by their sha256: check it, or a corrupt transfer would sit in the cache under that name.
        bool isSha256 = metadata.Etag.Length == 64 && metadata.Etag.All(char.IsAsciiHexDigitLower);
        long received = 0;
        string path = await cache.StoreAsync(file.Repo, file.Revision, commit, metadata.Etag, file.Path, async stream =>
        {
            using var sha = System.Security.Cryptography.SHA256.Create();
            await using (var hashing = new System.Security.Cryptography.CryptoStream(stream, sha, System.Security.Cryptography.CryptoStreamMode.Write, leaveOpen: true))
            {
                received = await response.CopyToAsync(isSha256 ? hashing : stream, bar, cancellationToken);
                CheckLength(file, received, expected);
            }
            if (isSha256 && Convert.ToHexStringLower(sha.Hash!) != metadata.Etag)
                throw new HubException(HubErrorKind.Protocol, $"the download of {file} does not match its sha256 {metadata.Etag}; nothing was stored, try again.");
        });
        return (path, received);
    }

    // A body shorter than announced is a dropped connection; throwing keeps the partial file out of the cache.
    private static void CheckLength(HubFile file, long received, long? expected)
    {
        if (expected is long length && received != length)
            throw new HubException(HubErrorKind.Protocol, $"the download of {file} ended after {received} of {length} bytes.");
    }

    private static string Decode(byte[] bytes) => new UTF8Encoding(false).GetString(bytes);
}
