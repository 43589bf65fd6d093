using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
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

    [Fact]
    public void An_unknown_layer_type_is_a_one_line_error() =>
        Assert.Throws<ConfigException>(() => Build(TextConfig(t =>
            t["layer_types"] = new JsonArray("full_attention", "linear_attention", "full_attention", "full_attention"))));
}
