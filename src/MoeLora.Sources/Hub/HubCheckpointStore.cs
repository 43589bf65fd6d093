using System.Net;
using MoeLora.Sources.Cache;
using MoeLora.Sources.Safetensors;

namespace MoeLora.Sources.Hub;

/// <summary>
/// A model revision on the Hub seen as a folder: safetensors files are read with Range requests (only their
/// headers are ever fetched), the index is downloaded through the cache.
/// </summary>
internal sealed class HubCheckpointStore(HubClient client, HubDownloader downloader, HubCache cache, RepoId repo, string revision, int probeBytes)
    : ICheckpointStore
{
    public string Location => $"{client.Endpoint}/{repo} (revision {revision})";

    public async Task<IRangeSource?> TryOpenAsync(string name, CancellationToken cancellationToken)
    {
        var file = new HubFile(repo, revision, name);
        try
        {
            // The probe doubles as the existence check: one request when the header fits in it.
            RangeRead probe = await HubRangeSource.ReadRangeAsync(client, file, 0, probeBytes, cancellationToken);
            return new HubRangeSource(client, file, probe);
        }
        catch (HubException ex) when (ex.Kind == HubErrorKind.EntryNotFound)
        {
            if (ex.Commit is not null) cache.MarkMissing(repo, ex.Commit, name);
            return null;
        }
    }

    public async Task<string?> TryReadTextAsync(string name, CancellationToken cancellationToken) =>
        (await downloader.TryDownloadTextAsync(new HubFile(repo, revision, name), cancellationToken))?.Text;
}

/// <summary>One Hub file read by byte ranges; remembers the probe read that opened it.</summary>
internal sealed class HubRangeSource(HubClient client, HubFile file, RangeRead probe) : IRangeSource
{
    public string Label => $"{client.Endpoint}/{file.Repo}/resolve/{file.Revision}/{file.Path}";

    public Task<RangeRead> ReadAsync(long offset, int count, CancellationToken cancellationToken)
    {
        if (offset == 0 && count <= probe.Bytes.Length)
            return Task.FromResult(new RangeRead(probe.Bytes[..count], probe.FileLength));
        return ReadRangeAsync(client, file, offset, count, cancellationToken);
    }

    public static async Task<RangeRead> ReadRangeAsync(HubClient client, HubFile file, long offset, int count, CancellationToken cancellationToken)
    {
        using HubResponse response = await client.GetAsync(file, offset, offset + count - 1, cancellationToken);
        switch (response.Message.StatusCode)
        {
            case HttpStatusCode.PartialContent:
                return new RangeRead(await response.ReadUpToAsync(count, cancellationToken), response.FileLength);
            case HttpStatusCode.RequestedRangeNotSatisfiable:
                // The range starts at or past the end: nothing to read; Content-Range "*/size" still gives the size.
                return new RangeRead([], response.Message.Content.Headers.ContentRange?.Length);
            default:
                // A server that ignores Range sends the whole file: read only up to what was asked, then hang up.
                byte[] prefix = await response.ReadUpToAsync((int)Math.Min(int.MaxValue, offset + count), cancellationToken);
                byte[] wanted = prefix.Length > offset ? prefix[(int)offset..] : [];
                return new RangeRead(wanted, response.FileLength);
        }
    }
}
