namespace MoeLora.Sources.Hub;

/// <summary>One file of one revision of a Hub model.</summary>
public sealed record HubFile(RepoId Repo, string Revision, string Path)
{
    /// <summary><c>{endpoint}/{repo}/resolve/{revision}/{path}</c>, encoded the way huggingface_hub encodes it.</summary>
    public Uri ResolveUrl(string endpoint)
    {
        // The revision is one segment even when it contains '/' (refs/pr/1 -> refs%2Fpr%2F1); the path keeps its '/'.
        string path = string.Join('/', Path.Split('/').Select(Uri.EscapeDataString));
        return new Uri($"{endpoint.TrimEnd('/')}/{Repo.Value}/resolve/{Uri.EscapeDataString(Revision)}/{path}");
    }

    public override string ToString() => $"{Repo}/{Path} (revision {Revision})";
}

/// <summary>What the Hub says about a file in its response headers (from the Hub's own host, never the CDN).</summary>
/// <param name="Commit"><c>X-Repo-Commit</c>: the commit the revision resolved to.</param>
/// <param name="Etag"><c>X-Linked-Etag</c> (LFS sha256) or <c>ETag</c> (git sha1), unquoted: the blob's name in the cache.</param>
/// <param name="Size"><c>X-Linked-Size</c> or the content length.</param>
public sealed record HubFileMetadata(string? Commit, string? Etag, long? Size);
