using MoeLora.Torch.IO;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

[Collection(TorchGlobalRng.Name)]
public class SafetensorsTests
{
    public SafetensorsTests() => TorchRuntime.EnsureInitialized();

    [Fact]
    public void RoundTripsEveryCommonDtypeBitExactly()
    {
        var path = Path.GetTempFileName();
        try
        {
            var gen = new Generator(5); // not torch's global RNG, which the trainer tests seed and save
            var src = new Dictionary<string, Tensor>
            {
                ["f32"] = randn([3, 4], generator: gen),
                ["bf16"] = randn([2, 5], generator: gen).to(ScalarType.BFloat16),
                ["f16"] = randn([7], generator: gen).to(ScalarType.Float16),
                ["i64"] = arange(6, ScalarType.Int64).reshape(2, 3),
                ["empty"] = zeros(0, 4),
            };
            Safetensors.Save(path, src, new Dictionary<string, string> { ["format"] = "pt" });
            var (_, meta, start) = Safetensors.ReadHeader(path);
            Assert.Equal("pt", meta["format"]);
            Assert.Equal(0, start % 8); // header padded so data is 8-byte aligned
            var back = Safetensors.Load(path);
            Assert.Equal(src.Keys.Order(), back.Keys.Order());
            foreach (var (k, t) in src)
            {
                Assert.Equal(t.dtype, back[k].dtype);
                Assert.Equal(t.shape, back[k].shape);
                Assert.True(t.bytes.SequenceEqual(back[k].bytes), k);
            }
        }
        finally { File.Delete(path); }
    }

    [Fact]
    public void RejectsTruncatedAndInconsistentFiles()
    {
        var path = Path.GetTempFileName();
        try
        {
            Safetensors.Save(path, new Dictionary<string, Tensor> { ["x"] = ones(4) });
            var bytes = File.ReadAllBytes(path);
            File.WriteAllBytes(path, bytes[..^4]);
            Assert.Throws<InvalidDataException>(() => Safetensors.ReadHeader(path));
            File.WriteAllBytes(path, [1, 2, 3]);
            Assert.Throws<InvalidDataException>(() => Safetensors.ReadHeader(path));
        }
        finally { File.Delete(path); }
    }

    /// <summary>
    /// The runtime reads files through Sources' parser: mutated and truncated real files load or raise
    /// <see cref="InvalidDataException"/> with a one-line message naming the file, never anything else. Bounded by a
    /// fixed count of seeded cases, not by time.
    /// </summary>
    [Fact]
    public void CorruptedFilesOnlyRaiseOneLineDataErrors()
    {
        var path = Path.GetTempFileName();
        try
        {
            Safetensors.Save(path, new Dictionary<string, Tensor> { ["a.weight"] = ones(3, 2), ["b"] = zeros(4, dtype: ScalarType.Int64) },
                new Dictionary<string, string> { ["format"] = "pt" });
            var valid = File.ReadAllBytes(path);
            int headerEnd = 8 + (int)BitConverter.ToUInt64(valid, 0);
            var random = new Random(11);
            int rejected = 0;
            for (int i = 0; i < 400; i++)
            {
                var bytes = (byte[])valid.Clone();
                if (i % 5 == 0) bytes = bytes[..random.Next(bytes.Length)];
                else
                    for (int k = random.Next(1, 4); k > 0; k--)
                        bytes[random.Next(headerEnd)] = (byte)random.Next(256);
                File.WriteAllBytes(path, bytes);
                try
                {
                    foreach (var t in Safetensors.Load(path).Values) t.Dispose();
                }
                catch (InvalidDataException e)
                {
                    rejected++;
                    Assert.Contains(path, e.Message);
                    Assert.DoesNotContain('\n', e.Message);
                }
            }
            Assert.True(rejected > 200, $"only {rejected} of 400 corruptions were rejected: the test would prove little");
        }
        finally { File.Delete(path); }
    }

    [Fact]
    public void ReadsTheFixtureCheckpointHeader()
    {
        var (entries, _, _) = Safetensors.ReadHeader(Path.Combine(Fixtures.Dir("mixtral"), "model", "model.safetensors"));
        Assert.Contains(entries, e => e.Name == "model.layers.0.block_sparse_moe.experts.3.w2.weight" && e.DType == "F32" && e.Shape.SequenceEqual(new long[] { 32, 64 }));
    }
}
