using System.Buffers;

namespace MoeLora.Cli.Infrastructure;

/// <summary>
/// An <see cref="IBufferWriter{T}"/> that hands out one reusable buffer and writes what was filled to a stream
/// whenever more room is asked for. <see cref="System.Text.Json.Utf8JsonWriter"/> on a plain stream keeps the whole
/// document in a buffer that doubles as it grows (about 0.5 MB allocated for DeepSeek-V3's 150 kB report, fresh
/// memory a cold process pays for in page faults); through this writer it is one 16 kB buffer. The bytes are the same.
/// </summary>
internal sealed class ChunkedStreamWriter(Stream stream, int chunkBytes = 16 * 1024) : IBufferWriter<byte>
{
    private byte[] _buffer = new byte[chunkBytes];
    private int _filled;

    public void Advance(int count)
    {
        if (count < 0 || _filled + count > _buffer.Length) throw new ArgumentOutOfRangeException(nameof(count));
        _filled += count;
    }

    public Memory<byte> GetMemory(int sizeHint = 0) => _buffer.AsMemory(Reserve(sizeHint));

    public Span<byte> GetSpan(int sizeHint = 0) => _buffer.AsSpan(Reserve(sizeHint));

    /// <summary>Writes the filled bytes to the stream.</summary>
    public void Flush()
    {
        if (_filled == 0) return;
        stream.Write(_buffer, 0, _filled);
        _filled = 0;
    }

    // Makes room for at least sizeHint bytes (at least one) after the filled part; returns where the free part starts.
    private int Reserve(int sizeHint)
    {
        var needed = Math.Max(sizeHint, 1);
        if (_buffer.Length - _filled >= needed) return _filled;
        Flush();
        if (_buffer.Length < needed) _buffer = new byte[needed];
        return 0;
    }
}
