using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Tests;

/// <summary>
/// DeepSeek-OCR-2 before its oracle data exists (transformers 5.17 does not build the shrunk default config, whose
/// mlp_layer_types is null): what follows from its modeling source and 5.17's conversion list alone. A small config in
/// the shape of tools/oracle/discover_moe.py's override (first layer dense, SAM window 2 with layer 1 global).
/// </summary>
public class DeepseekOcr2Tests
{
    private static JsonObject Config() => new()
    {
        ["model_type"] = "deepseek_ocr2",
        ["text_config"] = new JsonObject
        {
            ["vocab_size"] = 128, ["hidden_size"] = 64, ["intermediate_size"] = 96, ["num_hidden_layers"] = 4,
            ["num_attention_heads"] = 4, ["num_key_value_heads"] = 2, ["n_routed_experts"] = 4, ["num_experts_per_tok"] = 2,
            ["moe_intermediate_size"] = 48, ["mlp_layer_types"] = new JsonArray("dense", "sparse", "sparse", "sparse"),
        },
        ["vision_config"] = new JsonObject
        {
            ["sam_config"] = new JsonObject
            {
                ["hidden_size"] = 32, ["num_hidden_layers"] = 2, ["num_attention_heads"] = 2, ["image_size"] = 56, ["patch_size"] = 14,
                ["window_size"] = 2, ["global_attn_indexes"] = new JsonArray(1), ["mlp_dim"] = 64, ["output_channels"] = 24,
                ["downsample_channels"] = new JsonArray(48, 64),
            },
            ["encoder_config"] = new JsonObject
            {
                ["hidden_size"] = 64, ["intermediate_size"] = 96, ["num_hidden_layers"] = 2, ["num_attention_heads"] = 4,
                ["num_key_value_heads"] = 2,
            },
        },
    };

    private static ModelSpec Build(JsonObject config, Layout layout) => ArchitectureRegistry.Build(new ModelConfig(config), layout);

    [Fact]
    public void The_checkpoint_layout_holds_the_same_values_under_the_original_names()
    {
        var v5 = Build(Config(), Layout.V5);
        var v4 = Build(Config(), Layout.V4);

        Assert.Equal(v5.Tree.NumParameters, v4.Tree.NumParameters);
        // The conversion list reversed: sam_model.blocks.N.norm1 ← sam_encoder.layers.N.layer_norm1, qwen2_model.model.model
        // ← vision_encoder, projector.layers ← multi_modal_projector, view_seperator ← view_separator, the language model at
        // model.* with per-expert weights.
        var names = v4.Tree.Parameters.Select(p => p.Name).ToHashSet();
        Assert.Contains("model.sam_model.blocks.1.norm1.weight", names);
        Assert.Contains("model.sam_model.blocks.1.attn.rel_pos_h", names);
        Assert.Contains("model.sam_model.patch_embed.proj.weight", names);
        Assert.Contains("model.sam_model.neck.3.bias", names);
        Assert.Contains("model.sam_model.net_3.weight", names);
        Assert.Contains("model.qwen2_model.model.model.layers.1.self_attn.q_proj.bias", names);
        Assert.Contains("model.qwen2_model.query_1024.weight", names);
        Assert.Contains("model.projector.layers.bias", names);
        Assert.Contains("model.view_seperator", names);
        Assert.Contains("model.layers.3.mlp.experts.3.up_proj.weight", names);
        Assert.Contains("model.layers.0.mlp.gate_proj.weight", names);

        // Every runtime tensor finds its stored counterpart (loading and merge read this mapping).
        var layout = CheckpointLayout.For(v5)!;
        var unpaired = v5.Tree.Parameters.Where(p => !names.Contains(p.Name) && layout.For(p.Name) is null).Select(p => p.Name).ToList();
        Assert.Empty(unpaired);
    }

    [Fact]
    public void Relative_positions_span_the_window_or_in_a_global_layer_the_whole_grid()
    {
        var attn = Build(Config(), Layout.V5).Tree.Parameters
            .Where(p => p.LocalName == "rel_pos_h").Select(p => $"{p.Name} {string.Join(",", p.Shape)}");
        // 56 / 14 = a 4 x 4 grid: 2·2 − 1 rows in windowed layer 0, 2·4 − 1 in global layer 1; head_dim 32 / 2.
        Assert.Equal(
        [
            "model.vision_tower.sam_encoder.layers.0.attn.rel_pos_h 3,16",
            "model.vision_tower.sam_encoder.layers.1.attn.rel_pos_h 7,16",
        ], attn);
    }

    [Fact]
    public void A_config_without_mlp_layer_types_is_refused()
    {
        // DeepseekOcr2TextConfig has no default; DeepseekOcr2TextDecoderLayer indexes it (None[layer_idx] fails).
        var config = Config();
        config["text_config"]!.AsObject().Remove("mlp_layer_types");
        Assert.Throws<ConfigException>(() => Build(config, Layout.V5));
    }
}
