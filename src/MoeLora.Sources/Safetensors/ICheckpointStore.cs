namespace MoeLora.Sources.Safetensors;

/// <summary>The files of one model folder, wherever they are (disk, the Hub, or both).</summary>
public interface ICheckpointStore
{
    /// <summary>Where the folder is, for messages.</summary>
    string Location { get; }

    /// <summary>Opens a file for ranged reads, or returns null when the folder has no such file.</summary>
    Task<IRangeSource?> TryOpenAsync(string name, CancellationToken cancellationToken);

    /// <summary>Reads a small text file (an index), or returns null when the folder has no such file.</summary>
    Task<string?> TryReadTextAsync(string name, CancellationToken cancellationToken);
}

/// <summary>A model folder on disk.</summary>
public sealed class DirectoryCheckpointStore(string directory) : ICheckpointStore
{
    public string Location => directory;

    public Task<IRangeSource?> TryOpenAsync(string name, CancellationToken cancellationToken)
    {
        string path = Path.Combine(directory, name);
        return Task.FromResult<IRangeSource?>(File.Exists(path) ? new FileRangeSource(path) : null);
    }

    public async Task<string?> TryReadTextAsync(string name, CancellationToken cancellationToken)
    {
        string path = Path.Combine(directory, name);
        return File.Exists(path) ? await File.ReadAllTextAsync(path, cancellationToken) : null;
    }
}

/// <summary>Looks in each store in turn: e.g. a cached snapshot first, then the Hub for files it lacks.</summary>
public sealed class LayeredCheckpointStore(params ICheckpointStore[] stores) : ICheckpointStore
{
    public string Location => stores[^1].Location;

    public async Task<IRangeSource?> TryOpenAsync(string name, CancellationToken cancellationToken)
    {
        foreach (ICheckpointStore store in stores)
            if (await store.TryOpenAsync(name, cancellationToken) is { } source) return source;
        return null;
    }

    public async Task<string?> TryReadTextAsync(string name, CancellationToken cancellationToken)
    {
        foreach (ICheckpointStore store in stores)
            if (await store.TryReadTextAsync(name, cancellationToken) is { } text) return text;
        return null;
    }
}
