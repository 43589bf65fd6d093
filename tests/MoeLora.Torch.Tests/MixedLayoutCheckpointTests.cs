using MoeLora.Torch.IO;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Tests.Training;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// Core's CheckpointLayout maps each runtime tensor to the checkpoint: a checkpoint may hold the legacy (per-expert,
/// v4-named) layout, the transformers-5 fused layout, or a mix per tensor; loading, the header precheck and merge all
/// follow it, and merge writes back each tensor in the layout the checkpoint used.
/// </summary>
public class MixedLayoutCheckpointTests
{
    public MixedLayoutCheckpointTests() => TorchRuntime.EnsureInitialized();

    [Fact]
    public void ACheckpointMixingBothLayoutsLoadsPrechecksAndMergesBackInItsOwnLayout()
    {
        var modelDir = Path.Combine(Fixtures.Dir("mixtral"), "model");
        var inputs = Fixtures.Reference("mixtral");
        using var dir = new TempDir();
        var mixedDir = Path.Combine(dir.Path, "mixed");
        Directory.CreateDirectory(mixedDir);
        File.Copy(Path.Combine(modelDir, "config.json"), Path.Combine(mixedDir, "config.json"));

        // Layer 0's MoE block in transformers-5 names (fused experts, mlp.gate), every other tensor as the Hub stores it.
        using var original = new DisposableModel(TorchModelFactory.Load(modelDir));
        var raw = Safetensors.Load(Path.Combine(modelDir, "model.safetensors"));
        var mixed = raw.Where(kv => !kv.Key.StartsWith("model.layers.0.block_sparse_moe.", StringComparison.Ordinal)).ToList();
        var fused = original.Model.StateDict().Where(s => s.Name.StartsWith("model.layers.0.mlp.", StringComparison.Ordinal)).ToList();
        Assert.Equal(3, fused.Count); // gate.weight, experts.gate_up_proj, experts.down_proj
        mixed.AddRange(fused.Select(s => new KeyValuePair<string, Tensor>(s.Name, s.Value)));
        Assert.Contains(mixed, kv => kv.Key.StartsWith("model.layers.1.block_sparse_moe.experts.0.w1", StringComparison.Ordinal));
        Safetensors.Save(Path.Combine(mixedDir, "model.safetensors"), mixed, new Dictionary<string, string> { ["format"] = "pt" });

        Assert.Equal(CheckpointLoader.Precheck(modelDir, original.Model.Spec), CheckpointLoader.Precheck(mixedDir, original.Model.Spec));
        using var _ = no_grad();
        using var loaded = new DisposableModel(TorchModelFactory.Load(mixedDir));
        using (var a = original.Model.Forward(inputs["input_ids"], inputs["attention_mask"]))
        using (var b = loaded.Model.Forward(inputs["input_ids"], inputs["attention_mask"]))
            Assert.True(a.Logits.bytes.SequenceEqual(b.Logits.bytes));

        // A per-expert tensor of the wrong shape is named by the precheck in one line.
        var broken = Path.Combine(dir.Path, "broken");
        Directory.CreateDirectory(broken);
        File.Copy(Path.Combine(modelDir, "config.json"), Path.Combine(broken, "config.json"));
        Safetensors.Save(Path.Combine(broken, "model.safetensors"),
            mixed.Select(kv => kv.Key == "model.layers.1.block_sparse_moe.experts.2.w3.weight" ? new KeyValuePair<string, Tensor>(kv.Key, kv.Value[..^1]) : kv),
            new Dictionary<string, string> { ["format"] = "pt" });
        var e = Assert.Throws<InvalidDataException>(() => CheckpointLoader.Precheck(broken, original.Model.Spec));
        Assert.Contains("model.layers.1.block_sparse_moe.experts.2.w3.weight", e.Message);
        Assert.DoesNotContain('\n', e.Message);
        var load = Assert.Throws<InvalidDataException>(() => TorchModelFactory.Load(broken));
        Assert.Contains("experts.2.w3.weight", load.Message);

        // Merge writes the same keys (both layouts) back, and the merged checkpoint gives the adapted logits.
        LoraInjector.LoadPeftAdapter(loaded.Model, Path.Combine(Fixtures.Dir("mixtral"), "attn_plus_experts"));
        loaded.Model.Eval();
        using var want = loaded.Model.Forward(inputs["input_ids"], inputs["attention_mask"]);
        var outDir = Path.Combine(dir.Path, "merged");
        LoraMerge.SaveHubCheckpoint(loaded.Model, mixedDir, outDir);
        var (inKeys, _, _) = Safetensors.ReadHeader(Path.Combine(mixedDir, "model.safetensors"));
        var (outKeys, _, _) = Safetensors.ReadHeader(Path.Combine(outDir, "model.safetensors"));
        Assert.Equal(inKeys.Select(k => (k.Name, string.Join(",", k.Shape))), outKeys.Select(k => (k.Name, string.Join(",", k.Shape))));
        using var merged = new DisposableModel(TorchModelFactory.Load(outDir));
        using var got = merged.Model.Forward(inputs["input_ids"], inputs["attention_mask"]);
        Assert.True(Fixtures.MaskedRelError(got.Logits, want.Logits, inputs["attention_mask"]) < 1e-5);
        foreach (var t in raw.Values) t.Dispose();
    }
}
