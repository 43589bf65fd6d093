namespace MoeLora.Sources;

/// <summary>Where a model's config.json was found.</summary>
public enum ModelOrigin
{
    /// <summary>A folder or file given as a path.</summary>
    Local,
    /// <summary>The huggingface_hub cache on this machine.</summary>
    Cache,
    /// <summary>Downloaded from the Hub (and stored in the cache).</summary>
    Hub,
    /// <summary>The copy embedded in MoeLora.</summary>
    Catalog,
}

/// <summary>Options of one <see cref="ModelResolver.Resolve"/> call.</summary>
public sealed record ResolveOptions
{
    /// <summary>Branch, tag or commit on the Hub (<c>--revision</c>).</summary>
    public string Revision { get; init; } = "main";

    /// <summary>Fall back to the embedded catalog when no other source has the model.</summary>
    public bool UseCatalog { get; init; } = true;

    public static ResolveOptions Default { get; } = new();
}

/// <summary>A model's config.json and where it came from.</summary>
/// <param name="Id">The Hub id, or for a local model the folder path.</param>
/// <param name="ConfigJson">The config.json text, unchanged.</param>
/// <param name="Origin">Which source answered.</param>
/// <param name="Revision">The Hub revision asked for (null for local models).</param>
/// <param name="Commit">The commit it resolved to, when known.</param>
/// <param name="Directory">The folder holding config.json (a local folder or a cache snapshot), or null.</param>
/// <param name="Notes">Things the user should know, e.g. why a fallback was used. One sentence each.</param>
public sealed record ResolvedModel(
    string Id,
    string ConfigJson,
    ModelOrigin Origin,
    string? Revision,
    string? Commit,
    string? Directory,
    IReadOnlyList<string> Notes)
{
    /// <summary>The origin as the CLI prints it: local, cache, hub or catalog.</summary>
    public string OriginName => Origin.ToString().ToLowerInvariant();
}
