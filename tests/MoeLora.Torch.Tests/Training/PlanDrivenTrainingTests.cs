using System.Text.Json.Nodes;
using MoeLora.Torch.IO;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Training;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests.Training;

/// <summary>Training injects LoRA from Core's AdapterPlan, so PEFT's transformers-5 rewrite applies to new configs.</summary>
[Collection(TorchGlobalRng.Name)]
public class PlanDrivenTrainingTests
{
    public PlanDrivenTrainingTests() => TorchRuntime.EnsureInitialized();

    /// <summary>Random token rows (the hf-tiny vocabulary has 128 ids): enough for a few optimizer steps.</summary>
    static CbDataset RandomData(long vocab, int rows, int length, long seed)
    {
        var gen = new TorchSharp.torch.Generator((ulong)seed);
        Tokenised Row() => new(randint(0, vocab, [length], generator: gen).data<long>().ToArray(), Enumerable.Repeat(1L, length).ToArray());
        return new CbDataset(Enumerable.Range(0, rows).Select(_ => Row()).ToList(), Enumerable.Range(0, rows).Select(_ => Row()).ToList(), 2, seed);
    }

    [Fact]
    public void SeedTargetsOnQwen3MoeTrainAndSaveWhatPeftWould()
    {
        var fixture = Fixtures.Dir("qwen3_moe");
        var modelDir = Path.Combine(fixture, "model");
        // The fixture's seed_targets variant: q,k,v,o + gate/up/down_proj, which PEFT rewrites for v5 fused experts.
        const string seedTargets = """{"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "r": 4, "lora_alpha": 8}""";
        using var dir = new TempDir();
        using var h = new DisposableModel(TorchModelFactory.Load(modelDir));
        var adapter = CbModels.InjectAdapter(h.Model, seedTargets, seed: 7, baseModelNameOrPath: "../model");
        var plan = adapter.Plan!;
        Assert.Contains(plan.Targets, t => t.ParameterName == "gate_up_proj" && t.R == 8); // doubled rank for gate_up_proj
        var trainer = new CircuitBreakerTrainer(h.Model, adapter, RandomData(h.Model.VocabSize, 4, 6, 1), new TrainOptions
        {
            TargetLayers = [1, 2], TotalSteps = 3, LearningRate = 1e-2, CheckpointEvery = 0, OutputDir = dir.Path,
        });
        trainer.Start();
        trainer.Run();
        var outDir = Path.Combine(dir.Path, "adapter");
        trainer.SaveAdapter(outDir);

        // Saved tensors: exactly the plan's keys and shapes, and trained (B no longer zero).
        var saved = Safetensors.Load(Path.Combine(outDir, "adapter_model.safetensors"));
        Assert.Equal(plan.SavedTensors.Select(t => (t.SavedKey!, string.Join(",", t.Shape))).OrderBy(x => x.Item1, StringComparer.Ordinal),
            saved.Select(kv => (kv.Key, string.Join(",", kv.Value.shape))).OrderBy(x => x.Item1, StringComparer.Ordinal));
        Assert.Contains(saved, kv => kv.Key.EndsWith("mlp.experts.base_layer.lora_B.weight", StringComparison.Ordinal) && kv.Value.abs().max().item<float>() > 0);
        // The same keys and shapes as PEFT's own seed_targets adapter for this model.
        var peft = Safetensors.Load(Path.Combine(fixture, "seed_targets", "adapter_model.safetensors"));
        Assert.Equal(peft.Select(kv => (kv.Key, string.Join(",", kv.Value.shape))).OrderBy(x => x.Key, StringComparer.Ordinal),
            saved.Select(kv => (kv.Key, string.Join(",", kv.Value.shape))).OrderBy(x => x.Key, StringComparer.Ordinal));

        // adapter_config.json is PEFT's effective config: the fields PEFT wrote for the same request.
        var ours = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "adapter_config.json")))!.AsObject();
        var theirs = JsonNode.Parse(File.ReadAllText(Path.Combine(fixture, "seed_targets", "adapter_config.json")))!.AsObject();
        static JsonNode? Sorted(JsonNode? n) => n is JsonArray a ? new JsonArray(a.Select(x => x!.GetValue<string>()).Order(StringComparer.Ordinal).Select(x => (JsonNode)x).ToArray()) : n?.DeepClone();
        foreach (var key in new[] { "r", "lora_alpha", "target_modules", "target_parameters", "rank_pattern", "alpha_pattern", "base_model_name_or_path", "use_dora", "bias" })
            Assert.True(JsonNode.DeepEquals(Sorted(theirs[key]), Sorted(ours[key])), $"{key}: PEFT {theirs[key]?.ToJsonString()} vs ours {ours[key]?.ToJsonString()}");

        AssertReloadReproduces(h.Model, modelDir, outDir, Fixtures.Reference("qwen3_moe")["input_ids"]);
    }

    [Fact]
    public void DoraTrainsItsMagnitudeAndRoundTrips()
    {
        var modelDir = Path.Combine(Fixtures.Dir("llama"), "model");
        using var dir = new TempDir();
        using var h = new DisposableModel(TorchModelFactory.Load(modelDir));
        var adapter = CbModels.InjectAdapter(h.Model, """{"target_modules": ["q_proj", "v_proj"], "r": 2, "lora_alpha": 4, "use_dora": true}""", seed: 1);
        var trainer = new CircuitBreakerTrainer(h.Model, adapter, RandomData(h.Model.VocabSize, 4, 6, 2), new TrainOptions
        {
            TargetLayers = [1], TotalSteps = 2, LearningRate = 1e-2, CheckpointEvery = 0, OutputDir = dir.Path,
        });
        var magnitude = LoraInjector.PeftNamedParameters(h.Model).First(p => p.Name.Contains("lora_magnitude_vector")).Param;
        var before = magnitude.detach().clone();
        trainer.Start();
        trainer.Run();
        Assert.False(magnitude.equal(before).all().item<bool>(), "the DoRA magnitude was not trained");
        var outDir = Path.Combine(dir.Path, "adapter");
        trainer.SaveAdapter(outDir);
        var saved = Safetensors.Load(Path.Combine(outDir, "adapter_model.safetensors"));
        Assert.Equal(adapter.Plan!.SavedTensors.Select(t => t.SavedKey!).Order(StringComparer.Ordinal), saved.Keys.Order(StringComparer.Ordinal));
        Assert.Contains(saved.Keys, k => k.EndsWith("q_proj.lora_magnitude_vector", StringComparison.Ordinal));
        AssertReloadReproduces(h.Model, modelDir, outDir, Fixtures.Reference("llama")["input_ids"]);
    }

    /// <summary>The saved directory loads as a PEFT adapter onto a fresh base model and gives the trained model's logits.</summary>
    static void AssertReloadReproduces(CausalLm trained, string modelDir, string adapterDir, Tensor ids)
    {
        using var _ = no_grad();
        trained.Eval();
        using var expected = trained.Forward(ids);
        using var fresh = new DisposableModel(TorchModelFactory.Load(modelDir));
        LoraInjector.LoadPeftAdapter(fresh.Model, adapterDir);
        fresh.Model.Eval();
        using var actual = fresh.Model.Forward(ids);
        Assert.True(actual.Logits.equal(expected.Logits).all().item<bool>());
    }
}

[Collection(TorchGlobalRng.Name)]
public class TruncatedTrainingTests
{
    [Fact]
    public void TruncatedRunSavesTheWholeModelsAdapterWithUntrainedBlocksAsIdentity()
    {
        using var dir = new TempDir();
        using var run = new TinyRun(dir.Path, totalSteps: 2, batchSize: 2);
        run.Trainer.Start();
        run.Trainer.Run();
        var outDir = Path.Combine(dir.Path, "adapter");
        run.Trainer.SaveAdapter(outDir);
        // PEFT on the whole 6-block model wraps every block's fused experts (target_parameters ignore
        // layers_to_transform): the file holds exactly the whole model's plan, block 5 untrained (B = 0).
        var wholePlan = LoraInjector.Plan(TrainPreset.TinyConfigJson(), File.ReadAllText(Path.Combine(outDir, "adapter_config.json")));
        var saved = Safetensors.Load(Path.Combine(outDir, "adapter_model.safetensors"));
        Assert.Equal(wholePlan.SavedTensors.Select(t => t.SavedKey!).Order(StringComparer.Ordinal), saved.Keys.Order(StringComparer.Ordinal));
        var block5 = saved.Where(kv => kv.Key.Contains(".layers.5.", StringComparison.Ordinal)).ToList();
        Assert.NotEmpty(block5);
        Assert.All(block5.Where(kv => kv.Key.Contains(".lora_B.")), kv => Assert.Equal(0f, kv.Value.abs().max().item<float>()));

        // The whole model loads it without missing keys and its first blocks compute what the trained truncated model does.
        var (cb, _) = run.Data.Get(0);
        run.Model.Eval();
        using var _ = no_grad();
        using var want = run.Model.Forward(cb.InputIds, cb.AttentionMask, outputHiddenStates: true);
        using var whole = CbModels.Load(null, CbModels.ModelLayers(null), ScalarType.Float32, CPU);
        LoraInjector.LoadPeftAdapter(whole, outDir);
        whole.Eval();
        using var got = whole.Forward(cb.InputIds, cb.AttentionMask, outputHiddenStates: true);
        for (int i = 0; i < run.Model.NumLayers; i++)
            Assert.True(got.HiddenStates[i].equal(want.HiddenStates[i]).all().item<bool>(), $"hidden_states[{i}]");
        // And the truncated model (eval, resume) still loads it.
        using var truncated = CbModels.Load(null, run.Model.NumLayers, ScalarType.Float32, CPU);
        LoraInjector.LoadPeftAdapter(truncated, outDir);
    }
}
