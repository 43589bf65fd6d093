using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Tests;

/// <summary>
/// Inkling's hMLP vision tower beyond the oracle's two-layer tower: the widths plan_out_scales gives for the released
/// geometry (patch 40, temporal patch 2, four projections), worked out by hand from transformers' rules.
/// </summary>
public class InklingVisionTowerTests
{
    private static ModelSpec Build(JsonObject vision, Layout layout) =>
        ArchitectureRegistry.Build(new ModelConfig(new JsonObject
        {
            ["model_type"] = "inkling_mm_model",
            ["text_config"] = new JsonObject { ["hidden_size"] = 64, ["num_hidden_layers"] = 1, ["vocab_size"] = 128 },
            ["vision_config"] = vision,
        }), layout);

    [Fact]
    public void Four_projections_of_a_40_pixel_patch_follow_the_assigned_scales()
    {
        // Given: candidates (t, h, w, c) = (1,1,1,3), (1,5,5,128), (1,10,10,320), (1,20,20,1216), (1,40,40,4800), (2,40,40,·);
        // five rows against log-even sizes pick candidates 0, 1, 2, 4, 5 (least total distance, in order).
        var vision = new JsonObject { ["patch_size"] = 40, ["temporal_patch_size"] = 2, ["n_layers"] = 4 };

        // When
        var spec = Build(vision, Layout.V5);

        // Then: inputs are the start channels times the fold (25, 4, 16, 2); every projection but the last is normed.
        var tower = spec.Tree.Parameters.Where(p => p.Name.StartsWith("model.vision_tower.", StringComparison.Ordinal))
            .Select(p => $"{p.Name["model.vision_tower.".Length..]} {string.Join(",", p.Shape)}");
        Assert.Equal(
        [
            "encoder_layers.0.projection.weight 128,75", "encoder_layers.0.layer_norm.weight 128",
            "encoder_layers.1.projection.weight 320,512", "encoder_layers.1.layer_norm.weight 320",
            "encoder_layers.2.projection.weight 4800,5120", "encoder_layers.2.layer_norm.weight 4800",
            "encoder_layers.3.projection.weight 64,9600", "final_norm.weight 64",
        ], tower);
    }

    [Fact]
    public void The_checkpoint_layout_names_the_same_projections_linear_and_norm()
    {
        var vision = new JsonObject { ["patch_size"] = 40, ["temporal_patch_size"] = 2, ["n_layers"] = 4 };
        var v5 = Build(vision, Layout.V5).Tree.Parameters.Where(p => p.Name.StartsWith("model.vision_tower.", StringComparison.Ordinal))
            .Select(p => string.Join(",", p.Shape));
        var disk = Build(vision.DeepClone().AsObject(), Layout.V4).Tree.Parameters
            .Where(p => p.Name.StartsWith("model.visual.", StringComparison.Ordinal)).ToList();
        Assert.Equal(v5, disk.Select(p => string.Join(",", p.Shape)));
        Assert.Equal("model.visual.layers.linear_3.weight", disk[^2].Name);
    }

    [Fact]
    public void A_patch_of_one_pixel_is_a_one_line_error() =>
        Assert.Throws<ConfigException>(() => Build(new JsonObject { ["patch_size"] = 1 }, Layout.V5));
}
