using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Core.Tests;

/// <summary>Rules that changed between PEFT releases (peft-semantics §8), each pinned on a hand-checked case.</summary>
public class PeftVersionRuleTests
{
    private static ModelSpec Mixtral(Layout layout) => ArchitectureRegistry.Build(new ModelConfig(new JsonObject
    {
        ["model_type"] = "mixtral", ["hidden_size"] = 16, ["intermediate_size"] = 8, ["num_hidden_layers"] = 2,
        ["num_attention_heads"] = 4, ["num_key_value_heads"] = 4, ["vocab_size"] = 32, ["num_local_experts"] = 4,
        ["num_experts_per_tok"] = 2,
    }), layout);

    private static LoraConfig Lora(params string[] targets) => new() { R = 2, LoraAlpha = 4, TargetModules = ModuleSelector.List(targets) };

    [Fact]
    public void Layer_index_is_the_first_from_0_20_and_the_last_before()
    {
        // v4 Mixtral: model.layers.1.block_sparse_moe.experts.0.w1 — the lazy regex reads 1, the greedy one reads 0 (the expert).
        var spec = Mixtral(Layout.V4);
        var config = Lora("w1") with { LayersToTransform = [1] };
        var lazy = AdapterPlanner.Plan(spec, config, PeftVersion.Parse("0.20"));
        var greedy = AdapterPlanner.Plan(spec, config, PeftVersion.Parse("0.19.1"));
        Assert.All(lazy.Targets, t => Assert.Equal(1, t.Layer));
        Assert.Equal(4, lazy.Targets.Count);
        Assert.All(greedy.Targets, t => Assert.Contains(".experts.1.", t.Name));
        Assert.Equal(2, greedy.Targets.Count); // expert 1 of both layers
    }

    [Theory]
    [InlineData("0.17", 8, 16)]   // PEFT: in = d1, out = d2; under transformers 5 its patch swaps fused experts
    [InlineData("0.19.0", 16, 8)] // the bug: swap only when is_transposed, so Mixtral keeps in = d1
    [InlineData("0.19.1", 8, 16)] // swap unless is_transposed: (E, out, in) → in = d2
    [InlineData("0.21", 8, 16)]
    public void Fused_expert_orientation_follows_the_release(string version, long inFeatures, long outFeatures)
    {
        // transformers-5 Mixtral down_proj is (E, H=16, I=8): d1 = 16 (out), d2 = 8 (in), and not is_transposed.
        var plan = AdapterPlanner.Plan(Mixtral(Layout.V5),
            new LoraConfig { R = 2, LoraAlpha = 4, TargetModules = ModuleSelector.List([]), TargetParameters = ["experts.down_proj"] },
            PeftVersion.Parse(version));
        var t = plan.Targets.First();
        Assert.Equal((inFeatures, outFeatures), (t.InFeatures, t.OutFeatures));
        Assert.Equal(2 * 4 * (16 + 8), t.NumParameters); // r·E·(d1 + d2) whatever the orientation
    }

    [Fact]
    public void Moe_rewrite_starts_at_0_19_and_string_targets_at_0_20()
    {
        var spec = Mixtral(Layout.V5);
        Assert.Null(AdapterPlanner.Plan(spec, Lora("q_proj", "w1", "w3"), PeftVersion.Parse("0.18")).Conversion);
        var converted = AdapterPlanner.Plan(spec, Lora("q_proj", "w1", "w3"), PeftVersion.Parse("0.19.1"));
        Assert.True(converted.Conversion!.DoubledGateUp);
        Assert.Equal(4, converted.Targets.Single(t => t.ParameterName == "gate_up_proj" && t.Layer == 0).R);
        var regex = new LoraConfig { R = 2, LoraAlpha = 4, TargetModules = ModuleSelector.Regex(@".*\.(q_proj|w1|w3)") };
        Assert.Throws<PeftInjectionException>(() => AdapterPlanner.Plan(spec, regex with { TargetModules = ModuleSelector.Regex(@".*\.(w1|w3)") }, PeftVersion.Parse("0.19.1")));
        Assert.NotNull(AdapterPlanner.Plan(spec, regex, PeftVersion.Parse("0.20")).Conversion);
    }

    [Fact]
    public void Unfused_halves_are_peft_s_error()
    {
        var ex = Assert.Throws<PeftInjectionException>(() => AdapterPlanner.Plan(Mixtral(Layout.V5), Lora("w3", "w2")));
        Assert.Equal("ValueError", ex.PeftErrorType);
        Assert.Contains("without also targeting w1", ex.Message);
    }

    [Fact]
    public void Version_parsing_rejects_releases_without_target_parameters() =>
        Assert.Throws<MoeLora.Core.UserInputException>(() => PeftVersion.Parse("0.16"));
}
