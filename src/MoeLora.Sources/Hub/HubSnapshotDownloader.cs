using MoeLora.Sources.Cache;
using MoeLora.Sources.Safetensors;
using MoeLora.Core;

namespace MoeLora.Sources.Hub;

/// <summary>
/// Fetches the files a model needs into one cache snapshot, the way <c>hf_hub_download</c> does for each file:
/// the revision is pinned to one commit (from <c>config.json</c>'s metadata) so a branch that moves mid-download
/// cannot mix two commits; a file already in <c>snapshots/{commit}/</c> costs no request; otherwise a HEAD gives its
/// etag, a blob already in <c>blobs/</c> is only linked, and anything else is streamed into the cache.
/// Only plain resolve URLs are used, so the file list comes from names transformers looks for and the index.
/// </summary>
internal sealed class HubSnapshotDownloader(HubClient client, HubDownloader downloader, HubCache cache)
{
    /// <summary>What transformers reads besides the weights; all optional except config.json.</summary>
    public static readonly string[] StandardFiles =
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

    private const string ConfigFileName = "config.json";
    private const string SingleWeights = "model.safetensors";

    /// <param name="Done">Set when the file was already settled while the list was drawn up (the index).</param>
    private sealed record Planned(string Path, bool Required, HubFileMetadata? Metadata = null, DownloadedFile? Done = null);

    public async Task<DownloadResult> DownloadAsync(RepoId repo, DownloadOptions options, CancellationToken cancellationToken)
    {
        string revision = options.Revision;
        var patterns = (options.Include ?? []).Select(p => p.Trim()).Where(p => p.Length > 0).ToList();
        foreach (string literal in patterns.Where(p => !Glob.HasWildcard(p)))
            if (!HubCache.IsSafeRelativePath(literal))
                throw new UserInputException($"--include '{literal}' is not a file path inside the repository.");
        bool Wanted(string path) => patterns.Count == 0 || patterns.Any(p => Glob.IsMatch(p, path));

        // 1. Pin the revision to a commit. A commit hash is its own pin; otherwise config.json's metadata names it.
        HubFileMetadata? configMetadata = null;
        string commit;
        if (HubCache.IsCommitHash(revision))
        {
            commit = revision;
        }
        else
        {
            configMetadata = await HeadOrNullAsync(repo, revision, ConfigFileName, cancellationToken)
                ?? throw new HubException(HubErrorKind.EntryNotFound, $"model {repo} has no config.json at revision {revision} on {client.Endpoint}.");
            commit = configMetadata.Commit
                ?? throw new HubException(HubErrorKind.Protocol, $"{client.Endpoint} sent no X-Repo-Commit for {repo}/config.json, so the download cannot be pinned to a commit.");
            cache.WriteRef(repo, revision, commit);
        }

        // 2. The file list: configs and tokenizer files, the weights (single file or index plus shards), literal includes.
        var plan = new List<Planned>();
        foreach (string name in StandardFiles.Where(Wanted))
            plan.Add(new Planned(name, name == ConfigFileName, name == ConfigFileName ? configMetadata : null));

        string? weights = null;
        bool anyWildcard = patterns.Count == 0 || patterns.Any(Glob.HasWildcard);
        if (anyWildcard)
        {
            if (await ProbeAsync(repo, commit, SingleWeights, cancellationToken) is { } single)
            {
                if (Wanted(SingleWeights))
                {
                    plan.Add(new Planned(SingleWeights, true, single.Metadata));
                    weights = SingleWeights;
                }
            }
            else if (await ProbeAsync(repo, commit, CheckpointIndex.FileName, cancellationToken) is { } indexProbe)
            {
                // The index is fetched (it is small) to learn the shard names, even when a pattern leaves it out.
                DownloadedFile index = await FetchAsync(repo, commit, new Planned(CheckpointIndex.FileName, true, indexProbe.Metadata), cancellationToken);
                CheckpointIndex parsed = CheckpointIndex.Parse(await File.ReadAllTextAsync(index.LocalPath!, cancellationToken),
                    $"{repo}/{CheckpointIndex.FileName}");
                var shards = parsed.Shards.Where(Wanted).ToList();
                if (shards.Count > 0 || Wanted(CheckpointIndex.FileName))
                {
                    plan.Add(new Planned(index.Path, true, Done: index));
                    weights = CheckpointIndex.FileName;
                }
                plan.AddRange(shards.Select(s => new Planned(s, true)));
            }
            else if (patterns.Count == 0)
            {
                throw new ModelSourceException(
                    $"model {repo} has no safetensors weights at revision {revision} (neither model.safetensors nor model.safetensors.index.json); MoeLora reads only safetensors. Use --include to fetch other files.");
            }
        }
        foreach (string literal in patterns.Where(p => !Glob.HasWildcard(p)))
            if (plan.All(p => p.Path != literal))
                plan.Add(new Planned(literal, true));

        // 3. Fetch, one file at a time (each large file gets its own progress bar).
        var settled = new List<DownloadedFile>();
        foreach (Planned file in plan)
        {
            DownloadedFile done = file.Done ?? await FetchAsync(repo, commit, file, cancellationToken);
            settled.Add(done);
            options.OnFile?.Invoke(done);
        }
        return new DownloadResult(repo.Value, revision, commit, cache.SnapshotFolder(repo, commit), settled, weights);
    }

    /// <summary>Whether a file exists at the commit, from the cache when it knows, else with a HEAD.</summary>
    private async Task<Planned?> ProbeAsync(RepoId repo, string commit, string path, CancellationToken cancellationToken)
    {
        if (File.Exists(cache.SnapshotFile(repo, commit, path))) return new Planned(path, true);
        if (cache.IsKnownMissing(repo, commit, path)) return null;
        return await HeadOrNullAsync(repo, commit, path, cancellationToken) is { } metadata ? new Planned(path, true, metadata) : null;
    }

    private async Task<DownloadedFile> FetchAsync(RepoId repo, string commit, Planned file, CancellationToken cancellationToken)
    {
        string snapshot = cache.SnapshotFile(repo, commit, file.Path);
        if (File.Exists(snapshot)) return new DownloadedFile(file.Path, DownloadStatus.Cached, SizeOf(snapshot), 0, snapshot);
        if (!file.Required && cache.IsKnownMissing(repo, commit, file.Path))
            return new DownloadedFile(file.Path, DownloadStatus.Missing, 0, 0, null);

        HubFileMetadata? metadata = file.Metadata ?? await HeadOrNullAsync(repo, commit, file.Path, cancellationToken);
        if (metadata is null)
        {
            if (!file.Required) return new DownloadedFile(file.Path, DownloadStatus.Missing, 0, 0, null);
            throw new HubException(HubErrorKind.EntryNotFound, $"{file.Path} was not found in model {repo} at commit {commit}.");
        }

        if (metadata.Etag is { } etag && cache.HasBlob(repo, etag))
        {
            // Same blob as another revision already has: link it, fetch nothing (as hf_hub_download does).
            string linked = await cache.StoreAsync(repo, commit, commit, etag, file.Path,
                _ => throw new IOException($"blob {etag} vanished from the cache while linking {file.Path}; run the download again."));
            return new DownloadedFile(file.Path, DownloadStatus.Linked, SizeOf(linked), 0, linked);
        }

        (string path, long bytes) = await downloader.DownloadToCacheAsync(new HubFile(repo, commit, file.Path), commit, cancellationToken);
        return new DownloadedFile(file.Path, DownloadStatus.Downloaded, SizeOf(path), bytes, path);
    }

    // Snapshot entries are symlinks: the size is the blob's, not the link's.
    private static long SizeOf(string path)
    {
        var info = new FileInfo(path);
        return info.LinkTarget is null ? info.Length : ((FileInfo?)info.ResolveLinkTarget(returnFinalTarget: true))?.Length ?? 0;
    }

    private async Task<HubFileMetadata?> HeadOrNullAsync(RepoId repo, string revision, string path, CancellationToken cancellationToken)
    {
        try
        {
            return await client.HeadAsync(new HubFile(repo, revision, path), cancellationToken);
        }
        catch (HubException ex) when (ex.Kind == HubErrorKind.EntryNotFound)
        {
            if ((ex.Commit ?? (HubCache.IsCommitHash(revision) ? revision : null)) is { } commit) cache.MarkMissing(repo, commit, path);
            return null;
        }
    }
}
