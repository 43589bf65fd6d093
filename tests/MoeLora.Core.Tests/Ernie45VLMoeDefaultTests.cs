using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Tests;

/// <summary>
/// ERNIE 4.5 VL MoE has no oracle entry yet (transformers 5.17 cannot build the shrunk config the oracle had; see
/// tools/oracle/discover_moe.py's OVERRIDES). Until it has one, this checks what its modeling source states outright
/// for the config class defaults (Ernie4_5_VLMoeTextConfig / Ernie4_5_VLMoeVisionConfig).
/// </summary>
public class Ernie45VLMoeDefaultTests
{
    private static ModelSpec Build(Layout layout, Action<JsonObject>? edit = null)
    {
        var json = new JsonObject { ["model_type"] = "ernie4_5_vl_moe" };
        edit?.Invoke(json);
        return ArchitectureRegistry.Build(new ModelConfig(json), layout);
    }

    private static long[] Shape(ModelSpec spec, string name) =>
        spec.Tree.Parameters.Single(p => p.Name == name).Shape;

    [Fact]
    public void Default_config_has_the_modality_isolated_moe_layers()
    {
        var spec = Build(Layout.V5);
        Assert.Equal("Ernie4_5_VLMoeForConditionalGeneration", spec.Architecture);
        // mlp_layer_types defaults to ["dense"] + ["sparse"] * 27.
        Assert.Equal([0], spec.Moe.DenseLayers);
        Assert.Equal(Enumerable.Range(1, 27), spec.Moe.MoeLayers);
        const string L = "model.language_model.layers.";
        Assert.Equal([12288, 2560], Shape(spec, L + "0.mlp.gate_proj.weight"));
        // moe_intermediate_size [1536, 512]: text experts 1536 wide, vision experts 512; 64 of each.
        Assert.Equal([64, 2 * 1536, 2560], Shape(spec, L + "1.mlp.text_moe.experts.gate_up_proj"));
        Assert.Equal([64, 2560, 1536], Shape(spec, L + "1.mlp.text_moe.experts.down_proj"));
        Assert.Equal([64, 2 * 512, 2560], Shape(spec, L + "1.mlp.vision_moe.experts.gate_up_proj"));
        Assert.Equal([64, 2560, 512], Shape(spec, L + "1.mlp.vision_moe.experts.down_proj"));
        Assert.Equal([64, 2560], Shape(spec, L + "27.mlp.vision_moe.gate.weight"));
        Assert.Equal([1, 64], Shape(spec, L + "27.mlp.text_moe.gate.moe_statics.e_score_correction_bias"));
        // Two shared experts of the text width, fused into one MLP.
        Assert.Equal([2 * 1536, 2560], Shape(spec, L + "1.mlp.shared_experts.gate_proj.weight"));
        Assert.True(spec.Tree.Find("lm_head")!.Parameters.Single().IsTied);
        Assert.Equal(6, spec.Moe.ExpertsPerToken);
        Assert.NotNull(spec.RuntimeUnavailable);
        Assert.Null(spec.Runtime);
    }

    [Fact]
    public void Default_vision_tower_and_resampler()
    {
        var spec = Build(Layout.V5);
        Assert.Equal(32, spec.Tree.Modules.Count(m => m.ClassName == "Ernie4_5_VLMoeVisionBlock"));
        Assert.Equal([1280, 3 * 14 * 14], Shape(spec, "model.vision_tower.patch_embed.proj.weight"));
        Assert.Equal([3 * 1280, 1280], Shape(spec, "model.vision_tower.blocks.31.attn.qkv.weight"));
        Assert.Equal([5120, 1280], Shape(spec, "model.vision_tower.blocks.0.mlp.fc1.weight"));
        // spatial_merge_size 2 (4 patches of 1280), temporal_merge_size 2.
        Assert.Equal([5120, 5120], Shape(spec, "model.resampler_model.spatial_linear.fc1.weight"));
        Assert.Equal([5120, 10240], Shape(spec, "model.resampler_model.temporal_linear.fc1.weight"));
        Assert.Equal([2560, 5120], Shape(spec, "model.resampler_model.mlp.weight"));
    }

    /// <summary>The checkpoint conversion only renames, transposes, splits and concatenates: both layouts hold the same elements.</summary>
    [Fact]
    public void Both_layouts_hold_the_same_number_of_elements()
    {
        var v5 = Build(Layout.V5);
        var v4 = Build(Layout.V4);
        Assert.Equal(v5.Tree.NumParameters, v4.Tree.NumParameters);
        Assert.Equal(2 * 64, v4.Tree.Modules.Count(m => m.Name.StartsWith("model.layers.1.mlp.experts.", StringComparison.Ordinal)
            && m.Name.Count(ch => ch == '.') == 5));
    }

    /// <summary>
    /// transformers' ErnieFuseAndSplitTextVisionExperts splits the checkpoint's one per-expert list in halves: experts
    /// 0..63 stack into text_moe's fused tensors, 64..127 into vision_moe's.
    /// </summary>
    [Fact]
    public void Text_experts_come_first_in_the_checkpoint_list()
    {
        var layout = CheckpointLayout.For(Build(Layout.V5))!;
        const string L = "model.language_model.layers.5.mlp.";
        var text = layout.For(L + "text_moe.experts.gate_up_proj")!;
        var vision = layout.For(L + "vision_moe.experts.gate_up_proj")!;
        Assert.Equal(64, vision.NumExperts);
        Assert.Equal("model.layers.5.mlp.experts.0.gate_proj.weight", text.Parts[0].Name);
        Assert.Equal("model.layers.5.mlp.experts.63.up_proj.weight", text.Parts[^1].Name);
        Assert.Equal("model.layers.5.mlp.experts.64.gate_proj.weight", vision.Parts[0].Name);
        Assert.Equal("model.layers.5.mlp.experts.127.up_proj.weight", vision.Parts[^1].Name);
        Assert.All(vision.Parts, p => Assert.Equal([512, 2560], p.Shape));
        Assert.Equal("model.layers.5.mlp.experts.64.down_proj.weight", layout.For(L + "vision_moe.experts.down_proj")!.Parts[0].Name);
    }

    [Fact]
    public void Moe_intermediate_size_must_list_both_widths() =>
        Assert.Throws<ConfigException>(() => Build(Layout.V5, c => c["moe_intermediate_size"] = 1536));
}
