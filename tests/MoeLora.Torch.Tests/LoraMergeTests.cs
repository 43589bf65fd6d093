using MoeLora.Torch.IO;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Tests.Training;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>merge_and_unload: a merged Hub checkpoint loads as a plain model whose logits equal the adapted model's.</summary>
public class LoraMergeTests(ITestOutputHelper log)
{
    static LoraMergeTests() => TorchRuntime.EnsureInitialized();

    public static TheoryData<string, string> Cases => new()
    {
        { "mixtral", "attn_plus_experts" },      // Hub per-expert w1/w2/w3 under block_sparse_moe
        { "qwen3_moe", "seed_targets" },         // per-expert gate/up/down_proj, PEFT's v5 rewrite of the seed targets
        { "deepseek_v3", "attn_plus_experts" },  // MLA attention, per-expert tensors
        { "gpt_oss", "attn_plus_experts" },      // fused (E, in, out) experts with biases
        { "llama4_text", "attn_plus_experts" },  // fused (E, in, out) experts without is_transposed
        { "llama", "dora" },                     // DoRA on Linear
        { "qwen3_moe", "router" },               // 2-D router weight
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void MergedCheckpointGivesTheAdaptedLogits(string type, string variant)
    {
        var modelDir = Path.Combine(Fixtures.Dir(type), "model");
        var inputs = Fixtures.Reference(type);
        using var dir = new TempDir();
        using var adapted = new DisposableModel(TorchModelFactory.Load(modelDir));
        var config = File.ReadAllText(Path.Combine(modelDir, "config.json"));
        if (variant == "dora")
            LoraInjector.Inject(adapted.Model, LoraInjector.Plan(config, """{"target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4, "lora_alpha": 8, "use_dora": true, "init_lora_weights": false}"""), seed: 2);
        else if (variant == "router")
            LoraInjector.Inject(adapted.Model, LoraInjector.Plan(config, """{"target_parameters": ["mlp.gate.weight", "mlp.experts.down_proj"], "r": 2, "lora_alpha": 4, "init_lora_weights": false}"""), seed: 2);
        else LoraInjector.LoadPeftAdapter(adapted.Model, Path.Combine(Fixtures.Dir(type), variant));
        adapted.Model.Eval();
        using var _ = no_grad();
        using var want = adapted.Model.Forward(inputs["input_ids"], inputs["attention_mask"]);
        using (var plain = TorchModelFactory.Load(modelDir).Forward(inputs["input_ids"], inputs["attention_mask"]))
            Assert.True(Fixtures.MaskedRelError(plain.Logits, want.Logits, inputs["attention_mask"]) > 1e-4, "the adapter changes nothing: the test would prove nothing");

        var outDir = Path.Combine(dir.Path, "merged");
        LoraMerge.SaveHubCheckpoint(adapted.Model, modelDir, outDir);
        // Same Hub layout: file names, keys, shapes and dtypes.
        foreach (var f in Directory.GetFiles(modelDir, "*.safetensors"))
        {
            var (a, _, _) = Safetensors.ReadHeader(f);
            var (b, _, _) = Safetensors.ReadHeader(Path.Combine(outDir, Path.GetFileName(f)));
            Assert.Equal(a.Select(e => (e.Name, e.DType, string.Join(",", e.Shape))), b.Select(e => (e.Name, e.DType, string.Join(",", e.Shape))));
        }
        Assert.True(File.Exists(Path.Combine(outDir, "config.json")));
        using var merged = new DisposableModel(TorchModelFactory.Load(outDir));
        merged.Model.Eval();
        using var got = merged.Model.Forward(inputs["input_ids"], inputs["attention_mask"]);
        var err = Fixtures.MaskedRelError(got.Logits, want.Logits, inputs["attention_mask"]);
        log.WriteLine($"{type}/{variant}: merged vs adapted logits {err:E2}");
        Assert.True(err <= 1e-5, $"{type}/{variant}: merged logits differ by {err:E2}");
    }
}
