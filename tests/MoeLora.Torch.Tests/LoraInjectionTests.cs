using System.Text.Json.Nodes;
using MoeLora.Core.Peft;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

[Collection(TorchGlobalRng.Name)]
public class LoraInjectionTests
{
    public LoraInjectionTests() => TorchRuntime.EnsureInitialized();

    static CausalLm Model(string type) => TorchModelFactory.Load(Path.Combine(Fixtures.Dir(type), "model"));

    [Fact]
    public void FreshInjectionUsesPeftNamesShapesAndStartsAsTheBaseModel()
    {
        using var h = new DisposableModel(Model("qwen3_moe"));
        var plan = LoraInjector.Plan(h.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "target_parameters": ["mlp.experts.down_proj"],
             "rank_pattern": {".*\\.down_proj": 3}}
            """);
        var reference = Fixtures.Reference("qwen3_moe");
        using var _ = no_grad();
        using var before = h.Model.Forward(reference["input_ids"], reference["attention_mask"]);
        var adapter = LoraInjector.Inject(h.Model, plan);
        var names = LoraInjector.PeftNamedParameters(h.Model).ToDictionary(p => p.Name, p => p.Param.shape);
        Assert.Equal(new long[] { 2, 32 }, names["base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"]);
        Assert.Equal(new long[] { 32, 2 }, names["base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight"]);
        // down_proj [E=4, H=32, I=16] is (E, out, in): A (r·E, in) = (12, 16), B (out, r·E) = (32, 12).
        Assert.Equal(new long[] { 12, 16 }, names["base_model.model.model.layers.0.mlp.experts.lora_A.default.weight"]);
        Assert.Equal(new long[] { 32, 12 }, names["base_model.model.model.layers.0.mlp.experts.lora_B.default.weight"]);
        Assert.Contains(h.Model.NamedParameters(), p => p.Name == "model.layers.0.self_attn.q_proj.base_layer.weight");
        Assert.Contains(h.Model.NamedParameters(), p => p.Name == "model.layers.0.mlp.experts.base_layer.down_proj");
        Assert.Equal(3 * (2 * (32 + 32) + 3 * 4 * (16 + 32)), Measurements.CountParameters(h.Model).Trainable);
        // init_lora_weights=true: B = 0, so the adapted model starts equal to the base model.
        using var after = h.Model.Forward(reference["input_ids"], reference["attention_mask"]);
        Assert.True(after.Logits.bytes.SequenceEqual(before.Logits.bytes));
        Assert.Equal(2, adapter.Wrappers.Count(w => w.Module.EndsWith("layers.0.self_attn.q_proj") || w.Module.EndsWith("layers.0.mlp.experts")));
    }

    [Fact]
    public void ScalingFollowsRsLoraAndPatterns()
    {
        using var h = new DisposableModel(Model("llama"));
        var adapter = LoraInjector.Inject(h.Model, LoraInjector.Plan(h.Model,
            """{"r": 4, "lora_alpha": 8, "use_rslora": true, "target_modules": ["q_proj", "k_proj"], "alpha_pattern": {"k_proj": 2}}"""));
        var scaling = adapter.Wrappers.ToDictionary(w => w.Module, w => w.Wrapper.Scaling);
        Assert.Equal(8 / Math.Sqrt(4), scaling["model.layers.0.self_attn.q_proj"], 12);
        Assert.Equal(2 / Math.Sqrt(4), scaling["model.layers.0.self_attn.k_proj"], 12);
        Assert.All(scaling.Keys, k => Assert.Matches(@"\.(q|k)_proj$", k));
    }

    [Fact]
    public void DropoutIsActiveOnlyInTrainMode()
    {
        using var h = new DisposableModel(Model("llama"));
        LoraInjector.Inject(h.Model, LoraInjector.Plan(h.Model, """{"r": 4, "lora_alpha": 8, "lora_dropout": 0.5, "init_lora_weights": false, "target_modules": ["v_proj"]}"""));
        var ids = Fixtures.Reference("llama")["input_ids"];
        using var _ = no_grad();
        h.Model.Eval();
        using var e1 = h.Model.Forward(ids);
        using var e2 = h.Model.Forward(ids);
        Assert.True(e1.Logits.bytes.SequenceEqual(e2.Logits.bytes));
        h.Model.Train();
        using var t1 = h.Model.Forward(ids);
        Assert.False(t1.Logits.bytes.SequenceEqual(e1.Logits.bytes));
    }

    [Fact]
    public void UnsupportedTargetsFailLikePeft()
    {
        using var h = new DisposableModel(Model("qwen2_moe"));
        // PEFT's own errors, raised by Core's planner before anything is injected.
        var router = Assert.ThrowsAny<PeftConfigException>(() => LoraInjector.Plan(h.Model, """{"target_modules": ["gate"]}"""));
        Assert.Contains("gate", router.Message);
        Assert.ThrowsAny<PeftConfigException>(() => LoraInjector.Plan(h.Model, """{"target_modules": ["nothing"]}"""));
        Assert.ThrowsAny<PeftConfigException>(() => LoraInjector.Plan(h.Model, """{"peft_type": "IA3"}"""));
        Assert.Empty(LoraInjector.PeftNamedParameters(h.Model));
    }

    [Fact]
    public void SavedConfigMatchesWhatPeftWrote()
    {
        var src = Path.Combine(Fixtures.Dir("olmoe"), "seed_targets");
        using var h = new DisposableModel(Model("olmoe"));
        var adapter = LoraInjector.LoadPeftAdapter(h.Model, src);
        var targets = adapter.Plan.Targets.ToDictionary(t => t.Name);
        Assert.Equal(16, targets["model.layers.0.mlp.experts.gate_up_proj"].Alpha);
        Assert.Equal(8, targets["model.layers.0.mlp.experts.gate_up_proj"].R);
        Assert.Equal(4, targets["model.layers.0.mlp.experts.down_proj"].R);
        var json = JsonNode.Parse(File.ReadAllText(Path.Combine(src, "adapter_config.json")))!;
        Assert.True(JsonNode.DeepEquals(json, adapter.ConfigJson));
    }
}
