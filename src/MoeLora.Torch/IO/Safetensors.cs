using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using MoeLora.Sources.Safetensors;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.IO;

/// <summary>
/// Safetensors with tensor data: 8-byte little-endian header length, a JSON header
/// (<c>{"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}</c>), then raw
/// little-endian data. The header is parsed and validated by MoeLora.Sources' <see cref="SafetensorsReader"/> (the one
/// parser of the format: length cap, offsets tiling the data, dtypes, duplicate names, metadata); this class adds the
/// tensor data and the dtypes torch can hold.
/// </summary>
public static class Safetensors
{
    static readonly Dictionary<string, ScalarType> DTypes = new()
    {
        ["F64"] = ScalarType.Float64, ["F32"] = ScalarType.Float32, ["F16"] = ScalarType.Float16,
        ["BF16"] = ScalarType.BFloat16, ["I64"] = ScalarType.Int64, ["I32"] = ScalarType.Int32,
        ["I16"] = ScalarType.Int16, ["I8"] = ScalarType.Int8, ["U8"] = ScalarType.Byte, ["BOOL"] = ScalarType.Bool,
    };

    public sealed record Entry(string Name, string DType, long[] Shape, long Begin, long End)
    {
        /// <summary>The torch dtype of <see cref="DType"/> (header already validated).</summary>
        public ScalarType ScalarType => DTypes[DType];
    }

    /// <summary>
    /// Reads the header only. A file that breaks the format, or holds a dtype torch cannot load, is an
    /// <see cref="InvalidDataException"/> whose one-line message names the file and the problem.
    /// </summary>
    public static (IReadOnlyList<Entry> Entries, Dictionary<string, string> Metadata, long DataStart) ReadHeader(string path)
    {
        SafetensorsHeader header;
        try
        {
            header = SafetensorsReader.ReadHeaderAsync(path).GetAwaiter().GetResult();
        }
        catch (MoeLora.Sources.SafetensorsFormatException e)
        {
            throw new InvalidDataException(e.Message, e);
        }
        var entries = new List<Entry>(header.Tensors.Count);
        foreach (var t in header.Tensors)
        {
            var code = t.Dtype.Code();
            if (!DTypes.ContainsKey(code))
                throw new InvalidDataException($"{path}: tensor {t.Name} has dtype {code}, which MoeLora's runtime cannot load (it loads {string.Join(", ", DTypes.Keys)}).");
            entries.Add(new Entry(t.Name, code, t.Shape.ToArray(), t.DataBegin, t.DataEnd));
        }
        return (entries, new Dictionary<string, string>(header.Metadata), 8 + header.HeaderLength);
    }

    /// <summary>Loads every tensor (or those <paramref name="keep"/> accepts) onto the CPU in the file's dtype.</summary>
    public static Dictionary<string, Tensor> Load(string path, Func<string, bool>? keep = null)
    {
        var (entries, _, start) = ReadHeader(path);
        var result = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        using var fs = File.OpenRead(path);
        foreach (var e in entries)
        {
            if (keep is not null && !keep(e.Name)) continue;
            var buf = new byte[e.End - e.Begin];
            fs.Position = start + e.Begin;
            fs.ReadExactly(buf);
            var t = empty(e.Shape, DTypes[e.DType]);
            if (buf.Length > 0) t.bytes = buf;
            result[e.Name] = t;
        }
        return result;
    }

    /// <summary>
    /// Reads <paramref name="bytes"/> bytes at <paramref name="offset"/> of an open file straight into the memory of a
    /// contiguous CPU tensor (positioned reads, no managed buffer), e.g. one stored tensor of a checkpoint shard.
    /// </summary>
    public static unsafe void ReadInto(Microsoft.Win32.SafeHandles.SafeFileHandle file, long offset, long bytes, Tensor destination)
    {
        if (destination.device_type != DeviceType.CPU || !destination.is_contiguous())
            throw new ArgumentException("ReadInto needs a contiguous CPU tensor.");
        if (destination.numel() * destination.ElementSize != bytes)
            throw new ArgumentException($"ReadInto: {bytes} bytes do not fill a {destination.dtype} tensor of {destination.numel()} elements.");
        if (bytes == 0) return;
        var start = (byte*)Models.NativeStorage.DataPointer(destination) + destination.storage_offset() * destination.ElementSize;
        const int chunk = 1 << 30; // a Span addresses at most 2 GiB; large expert tensors are read in pieces
        for (long done = 0; done < bytes;)
        {
            int n = (int)Math.Min(chunk, bytes - done);
            int read = RandomAccess.Read(file, new Span<byte>(start + done, n), offset + done);
            if (read <= 0) throw new EndOfStreamException($"safetensors data ends {bytes - done} bytes early.");
            done += read;
        }
    }

    /// <summary>Writes tensors in the given order (sorted by name, as the Python library does, when unordered).</summary>
    public static void Save(string path, IEnumerable<KeyValuePair<string, Tensor>> tensors, IReadOnlyDictionary<string, string>? metadata = null)
    {
        var list = tensors.OrderBy(kv => kv.Key, StringComparer.Ordinal).ToList();
        var header = new JsonObject();
        if (metadata is not null)
        {
            var m = new JsonObject();
            foreach (var (k, v) in metadata) m[k] = v;
            header["__metadata__"] = m;
        }
        long offset = 0;
        var blobs = new List<byte[]>();
        foreach (var (name, t) in list)
        {
            using var c = t.detach().cpu().contiguous();
            var bytes = c.bytes.ToArray();
            var dtype = DTypes.FirstOrDefault(kv => kv.Value == c.dtype).Key
                ?? throw new NotSupportedException($"Tensor {name}: dtype {c.dtype} cannot be written to safetensors.");
            header[name] = new JsonObject
            {
                ["dtype"] = dtype,
                ["shape"] = new JsonArray(c.shape.Select(x => (JsonNode)x).ToArray()),
                ["data_offsets"] = new JsonArray(offset, offset + bytes.Length),
            };
            offset += bytes.Length;
            blobs.Add(bytes);
        }
        var json = Encoding.UTF8.GetBytes(header.ToJsonString(new JsonSerializerOptions { WriteIndented = false }));
        // Pad the header with spaces to an 8-byte boundary, as the reference writer does, so data stays aligned.
        int pad = (8 - json.Length % 8) % 8;
        using var fs = File.Create(path);
        Span<byte> len = stackalloc byte[8];
        BinaryPrimitives.WriteUInt64LittleEndian(len, (ulong)(json.Length + pad));
        fs.Write(len);
        fs.Write(json);
        for (int i = 0; i < pad; i++) fs.WriteByte((byte)' ');
        foreach (var b in blobs) fs.Write(b);
    }

    public static long ElementSize(ScalarType t) => t switch
    {
        ScalarType.Float64 or ScalarType.Int64 => 8,
        ScalarType.Float32 or ScalarType.Int32 => 4,
        ScalarType.Float16 or ScalarType.BFloat16 or ScalarType.Int16 => 2,
        _ => 1,
    };

}
