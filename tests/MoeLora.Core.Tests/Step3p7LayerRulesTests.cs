using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Tests.Support;

namespace MoeLora.Core.Tests;

/// <summary>
/// Step-3.7's per-layer rules beyond the oracle's all-full-attention config, derived from its tiny config: the head count
/// of a sliding layer, per_layer_config overrides, the legacy MoE layer list and trailing MTP entries.
/// </summary>
public class Step3p7LayerRulesTests
{
    private static JsonObject TextConfig(Action<JsonObject> edit) =>
        OracleData.MoeTinyConfig("step3p7", c => edit(c["text_config"]!.AsObject()));

    private static ModelSpec Build(JsonObject config) => ArchitectureRegistry.Build(new ModelConfig(config), Layout.V5);

    private static long[] Shape(ModelSpec spec, string name) => spec.Tree.Parameters.Single(p => p.Name == name).Shape;

    [Fact]
    public void Sliding_layers_take_num_sliding_attention_heads_unless_per_layer_config_overrides()
    {
        var spec = Build(TextConfig(t =>
        {
            t["layer_types"] = new JsonArray("full_attention", "sliding_attention", "full_attention", "sliding_attention");
            t["sliding_window"] = 16;
            t["num_sliding_attention_heads"] = 2;
            t["per_layer_config"] = new JsonObject { ["3"] = new JsonObject { ["num_attention_heads"] = 1 } };
        }));
        const string layers = "model.language_model.layers.";
        Assert.Equal([4L, 64], Shape(spec, layers + "0.self_attn.g_proj.weight"));
        Assert.Equal([2L * 24, 64], Shape(spec, layers + "1.self_attn.q_proj.weight"));
        Assert.Equal([2L, 64], Shape(spec, layers + "1.self_attn.g_proj.weight"));
        Assert.Equal([64L, 1 * 24], Shape(spec, layers + "3.self_attn.o_proj.weight"));
    }

    [Fact]
    public void Legacy_moe_layers_enum_and_mtp_padding_pick_the_moe_layers()
    {
        var spec = Build(TextConfig(t =>
        {
            t.Remove("mlp_layer_types");
            t["moe_layers_enum"] = "1,3";
            // A legacy config lists one more (MTP) layer; transformers splits it off.
            t["num_nextn_predict_layers"] = 1;
            t["layer_types"] = new JsonArray("full_attention", "full_attention", "full_attention", "full_attention", "full_attention");
        }));
        Assert.Equal([1, 3], spec.Moe.MoeLayers);
        Assert.Equal([0, 2], spec.Moe.DenseLayers);
    }

    private static StandardAttentionSettings Attention(ModelSpec spec, int layer) =>
        (StandardAttentionSettings)spec.Runtime!.Layers[layer].Attention;

    [Fact]
    public void Sliding_and_full_layers_take_their_own_window_heads_and_rope()
    {
        var spec = Build(TextConfig(t =>
        {
            t["layer_types"] = new JsonArray("full_attention", "sliding_attention", "full_attention", "sliding_attention");
            t["sliding_window"] = 6;
            t["num_sliding_attention_heads"] = 2;
            t["query_pre_attn_scalar"] = 64;
            t["rope_parameters"] = new JsonObject
            {
                ["full_attention"] = new JsonObject { ["rope_type"] = "default", ["rope_theta"] = 7000.0 },
                ["sliding_attention"] = new JsonObject { ["rope_type"] = "default", ["rope_theta"] = 3000.0, ["partial_rotary_factor"] = 0.5 },
            };
        }));
        var full = Attention(spec, 0);
        var sliding = Attention(spec, 1);
        Assert.Equal(new MaskSettings(MaskKind.Full), full.Mask);
        Assert.Equal(new MaskSettings(MaskKind.Sliding, 6), sliding.Mask);
        Assert.Equal(2, sliding.Heads);
        Assert.Equal(7000.0, full.Options!.Rope!.Theta);
        Assert.Equal(3000.0, sliding.Options!.Rope!.Theta);
        Assert.Equal(full.HeadDim / 2, sliding.RotaryDim);
        Assert.Equal(sliding.RotaryDim, sliding.Options.Rope.Dim);
        Assert.Equal(Math.Pow(64, -0.5), full.Options.Scaling);
        Assert.Equal(new OutputGate("g_proj", OutputGateKind.Sigmoid, PerHead: true), full.Options.Gate);
    }

    [Fact]
    public void Legacy_per_layer_rope_theta_lists_give_each_type_its_first_layers_theta()
    {
        // Without per-type rope_parameters transformers builds them from rope_theta / partial_rotary_factors per layer.
        var spec = Build(TextConfig(t =>
        {
            t.Remove("rope_parameters");
            t["layer_types"] = new JsonArray("sliding_attention", "full_attention", "sliding_attention", "full_attention");
            t["sliding_window"] = 4;
            t["rope_theta"] = new JsonArray(100.0, 200.0, 300.0, 400.0);
            t["partial_rotary_factors"] = new JsonArray(0.5, 1.0, 0.25, 1.0);
        }));
        Assert.Equal(100.0, Attention(spec, 2).Options!.Rope!.Theta);
        Assert.Equal(200.0, Attention(spec, 3).Options!.Rope!.Theta);
        Assert.Equal(Attention(spec, 0).HeadDim / 2, Attention(spec, 2).RotaryDim);
        Assert.Equal(Attention(spec, 1).HeadDim, Attention(spec, 1).RotaryDim);
    }

    [Fact]
    public void Swiglu_limits_clamp_the_activated_gate_of_their_layers_only()
    {
        var spec = Build(TextConfig(t =>
        {
            t["mlp_layer_types"] = new JsonArray("dense", "sparse", "sparse", "sparse");
            t["swiglu_limits"] = new JsonArray(0.0, null, 7.0, 0.0);
            t["swiglu_limits_shared"] = new JsonArray(16.0, 0.0, null, 5.0);
        }));
        var layers = spec.Runtime!.Layers;
        var dense = Assert.IsType<GatedMlpSettings>(layers[0].FeedForward);
        Assert.Equal((16.0, true, "silu"), (dense.ClampLimit, dense.ClampAfterActivation, dense.Act));
        var moe = layers.Skip(1).Select(l => (MoeSettings)l.FeedForward).ToList();
        Assert.Equal([ExpertsLayout.GateUpOutIn, ExpertsLayout.GateUpOutInClamped, ExpertsLayout.GateUpOutIn], moe.Select(m => m.Experts.Layout));
        Assert.Equal(7.0, moe[1].Experts.SwigluLimit);
        Assert.True(moe[1].Experts.ClampAfterActivation);
        Assert.Equal((1.0, 0.0), (moe[1].Experts.SwigluAlpha, moe[1].Experts.SwigluUpShift));
        Assert.Equal([null, null, 5.0], moe.Select(m => m.Shared!.ClampLimit));
    }

    [Theory]
    [InlineData("use_bidirectional_attention", "true")]
    [InlineData("mlp_bias", "true")]
    [InlineData("gating", "false")]
    public void What_the_runtime_does_not_reproduce_is_refused_in_one_line(string field, string json)
    {
        var spec = Build(TextConfig(t => t[field] = JsonNode.Parse(json)));
        Assert.Null(spec.Runtime);
        Assert.DoesNotContain('\n', spec.RuntimeUnavailable!);
        Assert.NotNull(Build(TextConfig(_ => { })).Runtime);
    }

    [Fact]
    public void An_unknown_layer_type_is_a_one_line_error() =>
        Assert.Throws<ConfigException>(() => Build(TextConfig(t =>
            t["layer_types"] = new JsonArray("full_attention", "linear_attention", "full_attention", "full_attention"))));
}
