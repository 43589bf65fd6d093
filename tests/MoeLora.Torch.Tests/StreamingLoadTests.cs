using System.Text.Json.Nodes;
using MoeLora.Torch.IO;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Tests.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// Checkpoints load one stored tensor at a time: host memory beyond the model is at most the largest stored tensor
/// (counted by the loader), per-expert parts go straight into their fused slice, and random init can be drawn on the
/// target device in the target dtype.
/// </summary>
public class StreamingLoadTests
{
    public StreamingLoadTests() => TorchRuntime.EnsureInitialized();

    /// <summary>The mixtral fixture (per-expert v4 checkpoint) split into three shards with an index.</summary>
    static (string Dir, long Largest, long Total, int Count) Sharded(TempDir t)
    {
        var modelDir = Path.Combine(Fixtures.Dir("mixtral"), "model");
        var dir = Path.Combine(t.Path, "sharded");
        Directory.CreateDirectory(dir);
        File.Copy(Path.Combine(modelDir, "config.json"), Path.Combine(dir, "config.json"));
        var raw = Safetensors.Load(Path.Combine(modelDir, "model.safetensors")).OrderBy(kv => kv.Key, StringComparer.Ordinal).ToList();
        var map = new JsonObject();
        for (int s = 0; s < 3; s++)
        {
            var name = $"model-{s + 1:00000}-of-00003.safetensors";
            var part = raw.Where((_, i) => i % 3 == s).ToList();
            Safetensors.Save(Path.Combine(dir, name), part, new Dictionary<string, string> { ["format"] = "pt" });
            foreach (var kv in part) map[kv.Key] = name;
        }
        File.WriteAllText(Path.Combine(dir, "model.safetensors.index.json"), new JsonObject { ["weight_map"] = map }.ToJsonString());
        long Bytes(Tensor x) => x.numel() * x.ElementSize;
        var result = (dir, raw.Max(kv => Bytes(kv.Value)), raw.Sum(kv => Bytes(kv.Value)), raw.Count);
        foreach (var kv in raw) kv.Value.Dispose();
        return result;
    }

    static CausalLm Empty(string dir, ScalarType dtype)
    {
        var spec = TorchModelFactory.Spec(File.ReadAllText(Path.Combine(dir, "config.json")));
        return ModelBuilder.Build(spec, new Nn.Init(dtype, CPU, spec.Runtime!.InitializerRange, null));
    }

    [Fact]
    public void AMultiShardCheckpointLoadsOneTensorAtATimeIntoTheModel()
    {
        using var t = new TempDir();
        var (dir, largest, total, count) = Sharded(t);
        using var reference = new DisposableModel(TorchModelFactory.Load(Path.Combine(Fixtures.Dir("mixtral"), "model")));

        // Same dtype on the CPU: every tensor is read straight into its parameter (or its expert slice), no staging.
        using var direct = new DisposableModel(Empty(dir, ScalarType.Float32));
        var progress = new List<LoadProgress>();
        var stats = CheckpointLoader.LoadInto(direct.Model, dir, skipDeeperLayers: false, progress.Add);
        Assert.Equal(count, stats.Tensors);
        Assert.Equal(total, stats.BytesRead);
        Assert.Equal(0, stats.LargestStagingBytes);
        Assert.Equal(count, progress.Count);
        Assert.Equal(total, progress[^1].Bytes);
        Assert.Equal(total, progress[^1].TotalBytes);
        Assert.True(progress.Zip(progress.Skip(1)).All(p => p.First.Bytes < p.Second.Bytes));
        foreach (var ((n, a), (_, b)) in reference.Model.StateDict().Zip(direct.Model.StateDict()))
            Assert.True(a.bytes.SequenceEqual(b.bytes), n);

        // Another dtype: one host staging tensor at a time, never more than the largest stored tensor.
        using var cast = new DisposableModel(Empty(dir, ScalarType.BFloat16));
        var castStats = CheckpointLoader.LoadInto(cast.Model, dir, skipDeeperLayers: false);
        Assert.Equal(largest, castStats.LargestStagingBytes);
        Assert.True(largest * 4 < total, "the fixture must have tensors much smaller than the checkpoint for this test to mean anything");
        foreach (var ((n, a), (_, b)) in reference.Model.StateDict().Zip(cast.Model.StateDict()))
        {
            using var expected = a.to(ScalarType.BFloat16);
            Assert.Equal(ScalarType.BFloat16, b.dtype);
            Assert.True(expected.bytes.SequenceEqual(b.bytes), n);
        }
    }

    [Fact]
    public void ATruncatedModelSkipsTheDeeperBlocksOfAShardedCheckpoint()
    {
        using var t = new TempDir();
        var (dir, _, _, count) = Sharded(t);
        var progress = new List<LoadProgress>();
        using var m = new DisposableModel(TorchModelFactory.LoadTruncated(dir, 1, ScalarType.Float32, null, progress.Add));
        Assert.Equal(1, m.Model.NumLayers);
        Assert.InRange(progress[^1].TotalTensors, 1, count - 1);
    }

    [Fact]
    public void RandomInitOnTheDeviceDrawsInTheTargetDtypeAndIsSeeded()
    {
        var config = File.ReadAllText(Path.Combine(Fixtures.Dir("qwen3_moe"), "model", "config.json"));
        using var a = new DisposableModel(TorchModelFactory.Random(config, 3, ScalarType.BFloat16, CPU, RandomInit.OnDevice));
        using var b = new DisposableModel(TorchModelFactory.Random(config, 3, ScalarType.BFloat16, CPU, RandomInit.OnDevice));
        using var portable = new DisposableModel(TorchModelFactory.Random(config, 3, ScalarType.BFloat16));
        using var fp32 = new DisposableModel(TorchModelFactory.Random(config, 3));
        double std = a.Model.Runtime.InitializerRange;
        foreach (var (((n, x), (_, y)), ((_, p), (_, f))) in a.Model.StateDict().Zip(b.Model.StateDict()).Zip(portable.Model.StateDict().Zip(fp32.Model.StateDict())))
        {
            Assert.Equal(ScalarType.BFloat16, x.dtype);
            Assert.True(x.bytes.SequenceEqual(y.bytes), n);
            // Portable init is the fp32 draw cast afterwards: the same weights whatever the dtype or device.
            using var expected = f.to(ScalarType.BFloat16);
            Assert.True(expected.bytes.SequenceEqual(p.bytes), n);
        }
        var gu = a.Model.NamedParameters().First(p => p.Name.EndsWith("experts.gate_up_proj", StringComparison.Ordinal)).Param;
        Assert.InRange(gu.to(ScalarType.Float32).std().item<float>(), 0.9 * std, 1.1 * std);
        using var pGu = portable.Model.NamedParameters().First(p => p.Name.EndsWith("experts.gate_up_proj", StringComparison.Ordinal)).Param.alias();
        Assert.False(gu.bytes.SequenceEqual(pGu.bytes)); // a different generator stream: device-dependent values, as documented
    }
}
