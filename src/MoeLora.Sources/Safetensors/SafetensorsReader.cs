using System.Buffers.Binary;

namespace MoeLora.Sources.Safetensors;

/// <summary>
/// Reads only the header of a safetensors file: first a probe of <c>probeBytes</c>, then, if the header is longer,
/// exactly the missing part (the same two-step protocol huggingface_hub uses over HTTP Range requests).
/// </summary>
public static class SafetensorsReader
{
    /// <summary>huggingface_hub's probe size: enough for about 97% of headers in one request.</summary>
    public const int DefaultProbeBytes = 100_000;

    public static async Task<SafetensorsHeader> ReadHeaderAsync(IRangeSource source, int probeBytes = DefaultProbeBytes, CancellationToken cancellationToken = default)
    {
        probeBytes = Math.Max(probeBytes, 8);
        RangeRead first = await source.ReadAsync(0, probeBytes, cancellationToken);
        if (first.Bytes.Length < 8)
            throw SafetensorsHeaderParser.Error(source.Label, $"it is {first.Bytes.Length} bytes long, too short for the 8-byte header length");

        ulong declared = BinaryPrimitives.ReadUInt64LittleEndian(first.Bytes);
        if (declared > SafetensorsHeader.MaxHeaderLength)
            throw SafetensorsHeaderParser.Error(source.Label, $"the header claims {declared} bytes, more than the {SafetensorsHeader.MaxHeaderLength}-byte limit");
        int headerLength = (int)declared;
        if (first.FileLength is long fileLength && 8 + headerLength > fileLength)
            throw SafetensorsHeaderParser.Error(source.Label, $"the header claims {headerLength} bytes but the file has only {fileLength - 8} after the length");

        byte[] header;
        if (headerLength <= first.Bytes.Length - 8)
        {
            header = first.Bytes.AsSpan(8, headerLength).ToArray();
        }
        else
        {
            // Ask for the missing part only; the length was checked against the file size (or the cap) above.
            int have = first.Bytes.Length - 8;
            RangeRead rest = await source.ReadAsync(first.Bytes.Length, headerLength - have, cancellationToken);
            if (rest.Bytes.Length != headerLength - have)
                throw SafetensorsHeaderParser.Error(source.Label, $"the header claims {headerLength} bytes but the file ends after {have + rest.Bytes.Length}");
            header = new byte[headerLength];
            first.Bytes.AsSpan(8).CopyTo(header);
            rest.Bytes.CopyTo(header.AsSpan(have));
        }

        long? fileSize = first.FileLength;
        return SafetensorsHeaderParser.Parse(header, fileSize is long size ? size - 8 - headerLength : null, source.Label);
    }

    /// <summary>Reads the header of a file on disk.</summary>
    public static Task<SafetensorsHeader> ReadHeaderAsync(string path, CancellationToken cancellationToken = default) =>
        ReadHeaderAsync(new FileRangeSource(path), DefaultProbeBytes, cancellationToken);

    /// <summary>Parses the header of a whole file held in memory.</summary>
    public static SafetensorsHeader ReadHeader(byte[] file, string label = "<memory>") =>
        ReadHeaderAsync(new MemoryRangeSource(file, label)).GetAwaiter().GetResult();
}
