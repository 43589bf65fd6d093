using System.Buffers.Binary;
using MoeLora.Sources.Safetensors;
using MoeLora.Sources.Tests.Support;

namespace MoeLora.Sources.Tests;

public class SafetensorsHeaderTests
{
    [Theory]
    [MemberData(nameof(TinyModels))]
    public async Task Tiny_checkpoints_parse_and_cover_the_whole_file(string modelType)
    {
        string path = Path.Combine(TestEnv.TinyDir(modelType), "model.safetensors");
        SafetensorsHeader header = await SafetensorsReader.ReadHeaderAsync(path);

        Assert.Equal(new FileInfo(path).Length, header.FileSize);
        Assert.NotEmpty(header.Tensors);
        Assert.All(header.Tensors, t => Assert.Equal(SafetensorsDtype.F32, t.Dtype));
        Assert.Equal("pt", header.Metadata["format"]);
        Assert.Contains(header.Tensors, t => t.Name == "model.embed_tokens.weight" && t.Shape.SequenceEqual([128L, 32L]));
    }

    public static TheoryData<string> TinyModels() => [.. TestEnv.TinyModelTypes];

    [Fact]
    public void Every_dtype_of_the_format_is_sized_in_bits()
    {
        var expected = new Dictionary<string, int>
        {
            ["BOOL"] = 8, ["F4"] = 4, ["F6_E2M3"] = 6, ["F6_E3M2"] = 6, ["U8"] = 8, ["I8"] = 8, ["F8_E5M2"] = 8,
            ["F8_E4M3"] = 8, ["F8_E8M0"] = 8, ["F8_E4M3FNUZ"] = 8, ["F8_E5M2FNUZ"] = 8, ["I16"] = 16, ["U16"] = 16,
            ["F16"] = 16, ["BF16"] = 16, ["I32"] = 32, ["U32"] = 32, ["F32"] = 32, ["C64"] = 64, ["F64"] = 64,
            ["I64"] = 64, ["U64"] = 64,
        };
        Assert.Equal(expected.Count, Enum.GetValues<SafetensorsDtype>().Length);
        foreach ((string code, int bits) in expected)
        {
            Assert.True(SafetensorsDtypes.TryParse(code, out SafetensorsDtype dtype), code);
            Assert.Equal(bits, dtype.Bits());
        }
        Assert.False(SafetensorsDtypes.TryParse("f32", out _));
        Assert.False(SafetensorsDtypes.TryParse("17", out _));
    }

    [Fact]
    public void A_file_with_every_dtype_round_trips()
    {
        var tensors = Enum.GetValues<SafetensorsDtype>().Select(d => ($"t.{d}", d, new long[] { 2, 4 })).ToList();
        byte[] file = SafetensorsBuilder.Build(tensors, new Dictionary<string, string> { ["format"] = "pt" });

        SafetensorsHeader header = SafetensorsReader.ReadHeader(file);

        Assert.Equal(tensors.Count, header.Tensors.Count);
        Assert.Equal(file.Length, header.FileSize);
        SafetensorsTensor f4 = header.Tensors.Single(t => t.Dtype == SafetensorsDtype.F4);
        Assert.Equal(4, f4.ByteCount);
        Assert.Equal(8, f4.ElementCount);
        Assert.Equal(6, header.Tensors.Single(t => t.Dtype == SafetensorsDtype.F6_E2M3).ByteCount);
    }

    [Fact]
    public void Tensors_listed_out_of_offset_order_are_sorted()
    {
        string json = """{"b":{"dtype":"U8","shape":[2],"data_offsets":[2,4]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}""";
        SafetensorsHeader header = SafetensorsReader.ReadHeader(SafetensorsBuilder.Assemble(json, 4));
        Assert.Equal(["a", "b"], header.Tensors.Select(t => t.Name));
    }

    [Fact]
    public void Scalars_and_empty_tensors_are_valid()
    {
        string json = """{"s":{"dtype":"F32","shape":[],"data_offsets":[0,4]},"e":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]}}""";
        SafetensorsHeader header = SafetensorsReader.ReadHeader(SafetensorsBuilder.Assemble(json, 4));
        Assert.Equal(1, header.Tensors.Single(t => t.Name == "s").ElementCount);
        Assert.Equal(0, header.Tensors.Single(t => t.Name == "e").ByteCount);
    }

    public static TheoryData<string, long, string> CorruptHeaders() => new()
    {
        { "[1,2]", 0, "does not start with '{'" },
        { "{\"a\":", 0, "not valid JSON" },
        { """{"a":{"dtype":"F33","shape":[1],"data_offsets":[0,4]}}""", 4, "unknown dtype" },
        { """{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}""", 4, "not a non-negative integer" },
        { """{"a":{"dtype":"F32","shape":[1.5],"data_offsets":[0,4]}}""", 4, "not a non-negative integer" },
        { """{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,0]}}""", 4, "before it begins" },
        { """{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}""", 4, "needs 8 bytes" },
        { """{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}""", 6, "overlap" },
        { """{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}}""", 12, "belong to no tensor" },
        { """{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}""", 8, "unused bytes" },
        { """{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}""", 10, "trailing bytes" },
        { """{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,1]}}""", 1, "whole bytes" },
        { """{"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}}""", 8, "too large" },
        { """{"a":{"dtype":"F32","shape":[1]}}""", 0, "no \"data_offsets\"" },
        { """{"a":{"dtype":"F32","shape":[1],"data_offsets":[0]}}""", 0, "data_offsets [begin, end]" },
        { """{"a":[1,2]}""", 0, "is not an object" },
        { """{"__metadata__":{"format":1}}""", 0, "not a string" },
        { """{"__metadata__":["pt"]}""", 0, "object of strings" },
        { """{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}""", 2, "appears twice" },
        { """{"a":{"dtype":"U8","shape":[[[[1]]]],"data_offsets":[0,1]}}""", 1, "not valid JSON" },
    };

    [Theory]
    [MemberData(nameof(CorruptHeaders))]
    public void Corrupt_headers_get_a_clear_one_line_error(string json, long dataLength, string expected)
    {
        byte[] file = SafetensorsBuilder.Assemble(json, dataLength);
        var error = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.ReadHeader(file, "bad.safetensors"));
        Assert.Contains(expected, error.Message, StringComparison.Ordinal);
        Assert.StartsWith("bad.safetensors is not a valid safetensors file: ", error.Message, StringComparison.Ordinal);
        Assert.DoesNotContain('\n', error.Message);
    }

    [Fact]
    public void Truncated_data_is_reported()
    {
        byte[] file = SafetensorsBuilder.Assemble("""{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}""", 16);
        var error = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.ReadHeader(file[..^4]));
        Assert.Contains("truncated", error.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(7)]
    public void Files_shorter_than_the_length_prefix_are_rejected(int length)
    {
        var error = Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.ReadHeader(new byte[length]));
        Assert.Contains("too short", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Header_lengths_beyond_the_cap_or_the_file_are_rejected_before_reading()
    {
        byte[] huge = new byte[16];
        BinaryPrimitives.WriteUInt64LittleEndian(huge, ulong.MaxValue);
        Assert.Contains("limit", Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.ReadHeader(huge)).Message, StringComparison.Ordinal);

        byte[] longer = new byte[16];
        BinaryPrimitives.WriteUInt64LittleEndian(longer, 1000);
        Assert.Contains("only 8", Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.ReadHeader(longer)).Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_header_longer_than_the_probe_is_read_in_a_second_step()
    {
        byte[] file = File.ReadAllBytes(Path.Combine(TestEnv.TinyDir("mixtral"), "model.safetensors"));
        var source = new CountingSource(new MemoryRangeSource(file));

        SafetensorsHeader header = await SafetensorsReader.ReadHeaderAsync(source, probeBytes: 64);

        Assert.Equal(2, source.Reads);
        Assert.Equal(8 + header.HeaderLength, source.BytesRead);
        Assert.Equal(SafetensorsReader.ReadHeader(file), header, HeaderComparer.Instance);
    }

    private sealed class CountingSource(IRangeSource inner) : IRangeSource
    {
        public int Reads { get; private set; }
        public long BytesRead { get; private set; }
        public string Label => inner.Label;

        public async Task<RangeRead> ReadAsync(long offset, int count, CancellationToken cancellationToken)
        {
            RangeRead read = await inner.ReadAsync(offset, count, cancellationToken);
            Reads++;
            BytesRead += read.Bytes.Length;
            return read;
        }
    }
}

/// <summary>Compares headers by content (records holding lists compare by reference).</summary>
public sealed class HeaderComparer : IEqualityComparer<SafetensorsHeader>
{
    public static readonly HeaderComparer Instance = new();

    public bool Equals(SafetensorsHeader? x, SafetensorsHeader? y) => Describe(x!) == Describe(y!);

    public int GetHashCode(SafetensorsHeader obj) => Describe(obj).GetHashCode(StringComparison.Ordinal);

    private static string Describe(SafetensorsHeader h) =>
        $"{h.HeaderLength}/{h.DataLength}/{string.Join(',', h.Metadata.OrderBy(p => p.Key))}/" +
        string.Join(';', h.Tensors.Select(t => $"{t} {t.DataBegin}-{t.DataEnd}"));
}
