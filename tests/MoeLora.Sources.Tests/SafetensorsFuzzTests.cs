using System.Buffers.Binary;
using CsCheck;
using MoeLora.Sources.Safetensors;
using MoeLora.Sources.Tests.Support;

namespace MoeLora.Sources.Tests;

/// <summary>
/// Throws random, mutated and truncated bytes at the header reader (the one parser the report and the TorchSharp
/// runtime share). Whatever the input, it must either return a header or throw <see cref="SafetensorsFormatException"/>,
/// and it must not allocate much more than the input it was given (a lying length field must not make it allocate).
/// The budget is bounded by counts and sizes (iterations × input length), never by the wall clock, so a slow CI machine
/// cannot fail it; a hang would show as the test never finishing.
/// </summary>
public class SafetensorsFuzzTests
{
    private static readonly byte[] Valid = File.ReadAllBytes(Path.Combine(TestEnv.TinyDir("qwen3_moe"), "model.safetensors"));

    private static readonly int ValidHeaderEnd = 8 + (int)BinaryPrimitives.ReadUInt64LittleEndian(Valid);

    [Fact]
    public void Random_bytes_only_ever_raise_the_format_exception() =>
        Gen.Byte.Array[0, 512].Sample(ParsesOrRejects, iter: 3000);

    [Fact]
    public void Random_bytes_behind_a_plausible_length_only_raise_the_format_exception() =>
        Gen.Select(Gen.Int[0, 600], Gen.Byte.Array[0, 600]).Sample((length, body) =>
        {
            var file = new byte[8 + body.Length];
            BinaryPrimitives.WriteUInt64LittleEndian(file, (ulong)length);
            body.CopyTo(file, 8);
            ParsesOrRejects(file);
        }, iter: 3000);

    [Fact]
    public void Mutated_real_headers_only_raise_the_format_exception() =>
        Gen.Select(Gen.Int[0, ValidHeaderEnd - 1], Gen.Byte, Gen.Int[1, 4]).Array[1, 8].Sample(edits =>
        {
            byte[] file = (byte[])Valid.Clone();
            foreach ((int at, byte value, int run) in edits)
                for (int i = at; i < Math.Min(at + run, ValidHeaderEnd); i++) file[i] = value;
            ParsesOrRejects(file);
        }, iter: 1500);

    [Fact]
    public void Every_truncation_of_a_real_file_is_rejected()
    {
        // Cut everywhere in the header and the first bytes of data, then sample the rest.
        IEnumerable<int> cuts = Enumerable.Range(0, ValidHeaderEnd + 64).Concat(Enumerable.Range(0, 200).Select(i => Valid.Length - 1 - i * 97));
        foreach (int cut in cuts.Where(c => c >= 0 && c < Valid.Length))
            Assert.Throws<SafetensorsFormatException>(() => SafetensorsReader.ReadHeader(Valid[..cut]));
    }

    [Fact]
    public void Headers_with_metadata_and_repeated_names_parse_or_are_rejected() =>
        Gen.Select(Gen.OneOf<string>("\"__metadata__\":{\"format\":\"pt\"}", "\"__metadata__\":{\"k\":1}", "\"__metadata__\":[]",
                "\"__metadata__\":{\"a\":\"x\",\"a\":\"y\"}", "\"__metadata__\":null", ""),
            Gen.Int[0, 3], Gen.Bool)
        .Sample((metadata, copies, sameName) =>
        {
            var entries = new List<string>();
            if (metadata.Length > 0) entries.Add(metadata);
            for (int i = 0; i < copies; i++)
                entries.Add($"\"{(sameName ? "t" : "t" + i)}\":{{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[{2 * i},{2 * i + 2}]}}");
            byte[] file = SafetensorsBuilder.Assemble("{" + string.Join(',', entries) + "}", 2 * copies);
            try
            {
                SafetensorsHeader header = SafetensorsReader.ReadHeader(file);
                Assert.Equal(copies, header.Tensors.Count);
                Assert.True(!sameName || copies <= 1, "a repeated tensor name was accepted");
            }
            catch (SafetensorsFormatException e)
            {
                Assert.DoesNotContain('\n', e.Message);
            }
        }, iter: 500);

    [Fact]
    public void Structured_random_headers_parse_or_are_rejected() =>
        GenHeaderJson.Sample(json => ParsesOrRejects(SafetensorsBuilder.Assemble(json.Json, json.DataLength)), iter: 2000);

    // JSON that is usually well-formed, with fields drawn from legal and illegal values.
    private static readonly Gen<(string Json, long DataLength)> GenHeaderJson =
        Gen.Select(
            Gen.OneOf<string>("F32", "BF16", "F4", "F6_E3M2", "U8", "C64", "X", "f32", "").Array[1, 4],
            Gen.Int[-2, 6].Array[0, 3].Array[1, 4],
            Gen.Int[-4, 40].Array[1, 4],
            Gen.Int[0, 64])
        .Select((dtypes, shapes, sizes, data) =>
        {
            int n = Math.Min(dtypes.Length, Math.Min(shapes.Length, sizes.Length));
            long offset = 0;
            var entries = new List<string>();
            for (int i = 0; i < n; i++)
            {
                long end = offset + sizes[i];
                entries.Add($"\"t{i}\":{{\"dtype\":\"{dtypes[i]}\",\"shape\":[{string.Join(',', shapes[i])}],\"data_offsets\":[{offset},{end}]}}");
                offset = end;
            }
            return ("{" + string.Join(',', entries) + "}", (long)data);
        });

    private static void ParsesOrRejects(byte[] file)
    {
        long before = GC.GetAllocatedBytesForCurrentThread();
        try
        {
            SafetensorsHeader header = SafetensorsReader.ReadHeader(file);
            Assert.Equal(file.Length, header.FileSize);
        }
        catch (SafetensorsFormatException)
        {
        }
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        Assert.True(allocated < 64L * file.Length + (1 << 20), $"allocated {allocated} bytes for a {file.Length}-byte input");
    }
}
