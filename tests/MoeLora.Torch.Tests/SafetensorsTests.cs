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
            var src = new Dictionary<string, Tensor>
            {
                ["f32"] = randn(3, 4),
                ["bf16"] = randn(2, 5).to(ScalarType.BFloat16),
                ["f16"] = randn(7).to(ScalarType.Float16),
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

    [Fact]
    public void ReadsTheFixtureCheckpointHeader()
    {
        var (entries, _, _) = Safetensors.ReadHeader(Path.Combine(Fixtures.Dir("mixtral"), "model", "model.safetensors"));
        Assert.Contains(entries, e => e.Name == "model.layers.0.block_sparse_moe.experts.3.w2.weight" && e.DType == "F32" && e.Shape.SequenceEqual(new long[] { 32, 64 }));
    }
}
