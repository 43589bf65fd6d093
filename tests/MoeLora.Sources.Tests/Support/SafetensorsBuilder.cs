using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using MoeLora.Sources.Safetensors;

namespace MoeLora.Sources.Tests.Support;

/// <summary>Writes small, valid safetensors files (zero-filled data) for tests.</summary>
public static class SafetensorsBuilder
{
    public static byte[] Build(IEnumerable<(string Name, SafetensorsDtype Dtype, long[] Shape)> tensors, IDictionary<string, string>? metadata = null)
    {
        var header = new Dictionary<string, object>();
        if (metadata is not null) header["__metadata__"] = metadata;
        long offset = 0;
        foreach ((string name, SafetensorsDtype dtype, long[] shape) in tensors)
        {
            long bytes = shape.Aggregate(1L, (a, b) => a * b) * dtype.Bits() / 8;
            header[name] = new { dtype = dtype.Code(), shape, data_offsets = new[] { offset, offset + bytes } };
            offset += bytes;
        }
        return Assemble(JsonSerializer.Serialize(header), offset);
    }

    /// <summary>Puts a raw JSON header in front of <paramref name="dataLength"/> zero bytes, padded to 8 like the reference writer.</summary>
    public static byte[] Assemble(string json, long dataLength)
    {
        byte[] header = Encoding.UTF8.GetBytes(json);
        int padded = (header.Length + 7) / 8 * 8;
        var file = new byte[8 + padded + dataLength];
        BinaryPrimitives.WriteUInt64LittleEndian(file, (ulong)padded);
        header.CopyTo(file, 8);
        file.AsSpan(8 + header.Length, padded - header.Length).Fill((byte)' ');
        return file;
    }
}
