using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>The Qwen3-VL vision tower, shared by Qwen3-VL-MoE, Qwen3.5-MoE and Qwen3-Omni's thinker (class names differ only by prefix).</summary>
internal static partial class Blocks
{
    /// <summary>The Qwen3-VL vision config's sizes (defaults: Qwen3VLMoeVisionConfig, Qwen3_5MoeVisionConfig and
    /// Qwen3OmniMoeVisionEncoderConfig, all identical); <see cref="ActClass"/> is the MLP activation's module class.</summary>
    public sealed record QwenVisionDims(long Depth, long Hidden, long Intermediate, long Channels, long Patch, long TemporalPatch,
        long OutHidden, long Positions, long Deepstack, string ActClass, long Merged)
    {
        public static QwenVisionDims Read(ModelConfig v, Layout layout)
        {
            var hv = v.Positive("hidden_size", 1152);
            var merge = v.Positive("spatial_merge_size", 2);
            return new QwenVisionDims(v.Int("depth", 27), hv, v.Positive("intermediate_size", 4304), v.Positive("in_channels", 3),
                v.Positive("patch_size", 16), v.Positive("temporal_patch_size", 2), v.Positive("out_hidden_size", 3584),
                v.Positive("num_position_embeddings", 2304), v.IntList("deepstack_visual_indexes")?.Count ?? 3,
                ActivationClass(v.String("hidden_act", "gelu_pytorch_tanh")!, layout), hv * merge * merge);
        }
    }

    /// <summary>
    /// <c>{P}VisionModel</c> as <paramref name="attr"/> (<c>visual</c>): <see cref="QwenVisionBody"/>, a patch merger
    /// over <c>spatial_merge_size²</c> patches to <c>out_hidden_size</c>, and, when <paramref name="deepstack"/>, one
    /// post-shuffle-norm merger per <c>deepstack_visual_indexes</c> entry.
    /// </summary>
    public static void QwenVisionTower(TreeBuilder b, string attr, string p, ModelConfig v, Layout layout, bool deepstack)
    {
        var t = QwenVisionDims.Read(v, layout);
        using (b.Scope(attr, p + "VisionModel", ModuleLocation.Vision))
        {
            QwenVisionBody(b, p, t);
            QwenPatchMerger(b, "merger", p, t.Hidden, t.Merged, t.OutHidden, postShuffleNorm: false);
            if (deepstack)
                b.ModuleList("deepstack_merger_list", t.Deepstack,
                    j => QwenPatchMerger(b, j.ToString(System.Globalization.CultureInfo.InvariantCulture), p, t.Hidden, t.Merged, t.OutHidden, postShuffleNorm: true));
        }
    }

    /// <summary>
    /// What every Qwen3-VL-style vision tower holds before its mergers: a Conv3d patch embedding over
    /// (temporal_patch_size, patch_size, patch_size), a learned position table, the rotary embedding and <c>depth</c>
    /// pre-norm blocks (fused qkv, a two-layer MLP).
    /// </summary>
    public static void QwenVisionBody(TreeBuilder b, string p, QwenVisionDims t)
    {
        using (b.Scope("patch_embed", p + "VisionPatchEmbed"))
        using (b.Scope("proj", "Conv3d", kind: ModuleKind.Other))
        {
            b.Param("weight", t.Hidden, t.Channels, t.TemporalPatch, t.Patch, t.Patch);
            b.Param("bias", t.Hidden);
        }
        b.Embedding("pos_embed", t.Positions, t.Hidden, ModuleLocation.Vision);
        b.Leaf("rotary_pos_emb", p + "VisionRotaryEmbedding");
        b.ModuleList("blocks", t.Depth, j =>
        {
            using (b.Scope(j.ToString(System.Globalization.CultureInfo.InvariantCulture), p + "VisionBlock"))
            {
                b.LayerNorm("norm1", t.Hidden);
                b.LayerNorm("norm2", t.Hidden);
                using (b.Scope("attn", p + "VisionAttention"))
                {
                    b.Linear("qkv", t.Hidden, t.Hidden * 3, bias: true);
                    b.Linear("proj", t.Hidden, t.Hidden, bias: true);
                }
                using (b.Scope("mlp", p + "VisionMLP"))
                {
                    b.Linear("linear_fc1", t.Hidden, t.Intermediate, bias: true);
                    b.Linear("linear_fc2", t.Intermediate, t.Hidden, bias: true);
                    b.Leaf("act_fn", t.ActClass);
                }
            }
        });
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
