using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>The Qwen3-VL vision tower, shared by Qwen3-VL-MoE and Qwen3.5-MoE (class names differ only by prefix).</summary>
internal static partial class Blocks
{
    /// <summary>
    /// <c>{P}VisionModel</c> as <paramref name="attr"/> (<c>visual</c>): a Conv3d patch embedding over
    /// (temporal_patch_size, patch_size, patch_size), a learned position table, <c>depth</c> pre-norm blocks (fused
    /// qkv), a patch merger over <c>spatial_merge_size²</c> patches to <c>out_hidden_size</c>, and, when
    /// <paramref name="deepstack"/>, one post-shuffle-norm merger per <c>deepstack_visual_indexes</c> entry.
    /// Defaults: Qwen3VLMoeVisionConfig / Qwen3_5MoeVisionConfig (identical).
    /// </summary>
    public static void QwenVisionTower(TreeBuilder b, string attr, string p, ModelConfig v, Layout layout, bool deepstack)
    {
        var depth = v.Int("depth", 27);
        var hv = v.Positive("hidden_size", 1152);
        var iv = v.Positive("intermediate_size", 4304);
        var channels = v.Positive("in_channels", 3);
        var patch = v.Positive("patch_size", 16);
        var temporal = v.Positive("temporal_patch_size", 2);
        var merge = v.Positive("spatial_merge_size", 2);
        var outHidden = v.Positive("out_hidden_size", 3584);
        var positions = v.Positive("num_position_embeddings", 2304);
        var act = ActivationClass(v.String("hidden_act", "gelu_pytorch_tanh")!, layout);
        var merged = hv * merge * merge;

        using (b.Scope(attr, p + "VisionModel", ModuleLocation.Vision))
        {
            using (b.Scope("patch_embed", p + "VisionPatchEmbed"))
            using (b.Scope("proj", "Conv3d", kind: ModuleKind.Other))
            {
                b.Param("weight", hv, channels, temporal, patch, patch);
                b.Param("bias", hv);
            }
            b.Embedding("pos_embed", positions, hv, ModuleLocation.Vision);
            b.Leaf("rotary_pos_emb", p + "VisionRotaryEmbedding");
            b.ModuleList("blocks", depth, j =>
            {
                using (b.Scope(j.ToString(System.Globalization.CultureInfo.InvariantCulture), p + "VisionBlock"))
                {
                    b.LayerNorm("norm1", hv);
                    b.LayerNorm("norm2", hv);
                    using (b.Scope("attn", p + "VisionAttention"))
                    {
                        b.Linear("qkv", hv, hv * 3, bias: true);
                        b.Linear("proj", hv, hv, bias: true);
                    }
                    using (b.Scope("mlp", p + "VisionMLP"))
                    {
                        b.Linear("linear_fc1", hv, iv, bias: true);
                        b.Linear("linear_fc2", iv, hv, bias: true);
                        b.Leaf("act_fn", act);
                    }
                }
            });
            QwenPatchMerger(b, "merger", p, hv, merged, outHidden, postShuffleNorm: false);
            if (deepstack)
            {
                var count = v.IntList("deepstack_visual_indexes")?.Count ?? 3;
                b.ModuleList("deepstack_merger_list", count,
                    j => QwenPatchMerger(b, j.ToString(System.Globalization.CultureInfo.InvariantCulture), p, hv, merged, outHidden, postShuffleNorm: true));
            }
        }
    }

    /// <summary><c>{P}VisionPatchMerger</c>: LayerNorm (over one patch, or over the merged patches after the shuffle), fc1, GELU, fc2.</summary>
    private static void QwenPatchMerger(TreeBuilder b, string name, string p, long hv, long merged, long outHidden, bool postShuffleNorm)
    {
        using (b.Scope(name, p + "VisionPatchMerger"))
        {
            b.LayerNorm("norm", postShuffleNorm ? merged : hv);
            b.Linear("linear_fc1", merged, merged, bias: true);
            b.Leaf("act_fn", "GELU");
            b.Linear("linear_fc2", merged, outHidden, bias: true);
        }
    }
}
