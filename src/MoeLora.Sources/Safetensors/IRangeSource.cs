namespace MoeLora.Sources.Safetensors;

/// <summary>Bytes of one file read at an offset: a local file, a buffer, or ranged HTTP requests.</summary>
public interface IRangeSource
{
    /// <summary>Names the file in messages (a path or a Hub address).</summary>
    string Label { get; }

    /// <summary>
    /// Reads up to <paramref name="count"/> bytes at <paramref name="offset"/>; fewer only at the end of the file.
    /// Implementations must not allocate more than the bytes they return.
    /// </summary>
    Task<RangeRead> ReadAsync(long offset, int count, CancellationToken cancellationToken);
}

/// <summary>Result of <see cref="IRangeSource.ReadAsync"/>.</summary>
/// <param name="Bytes">The bytes read.</param>
/// <param name="FileLength">The whole file's length when the source knows it.</param>
public sealed record RangeRead(byte[] Bytes, long? FileLength);

/// <summary>A file on disk.</summary>
public sealed class FileRangeSource(string path) : IRangeSource
{
    public string Label => path;

    public async Task<RangeRead> ReadAsync(long offset, int count, CancellationToken cancellationToken)
    {
        using var handle = File.OpenHandle(path, FileMode.Open, FileAccess.Read, FileShare.Read, FileOptions.Asynchronous);
        long length = RandomAccess.GetLength(handle);
        int available = (int)Math.Clamp(length - offset, 0, count);
        var buffer = new byte[available];
        int total = 0;
        while (total < available)
        {
            int read = await RandomAccess.ReadAsync(handle, buffer.AsMemory(total), offset + total, cancellationToken);
            if (read == 0) break;
            total += read;
        }
        return new RangeRead(total == available ? buffer : buffer[..total], length);
    }
}

/// <summary>A file already in memory (tests, fuzzing).</summary>
public sealed class MemoryRangeSource(byte[] bytes, string label = "<memory>") : IRangeSource
{
    public string Label => label;

    public Task<RangeRead> ReadAsync(long offset, int count, CancellationToken cancellationToken)
    {
        int start = (int)Math.Clamp(offset, 0, bytes.Length);
        int length = Math.Min(count, bytes.Length - start);
        return Task.FromResult(new RangeRead(bytes.AsSpan(start, length).ToArray(), bytes.Length));
    }
}
