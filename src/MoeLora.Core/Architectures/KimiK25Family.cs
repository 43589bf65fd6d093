using System.Text.Json.Nodes;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Kimi K2.5 (<c>kimi_k25</c>), built as AutoModelForImageTextToText builds it: <c>Kimi_K25ForConditionalGeneration</c>
/// with <c>model.vision_tower</c> (MoonViT: Conv2d patch embedding, a learned [H, W, hidden] position grid, pre-norm
/// encoder layers with separate q/k/v plus <c>proj</c>, fc1/fc2 MLPs), <c>model.language_model</c> (AutoModel of
/// <c>text_config</c>, DeepSeek-V3 by default and for "kimi_k2"; built here by that type's own family),
/// <c>model.mm_projector</c> (LayerNorm over <c>projection_hidden_size</c>, in_proj over the merged patches, out_proj to
/// the text width) and a root <c>lm_head</c>, tied by default. Kimi K2.5 did not exist in transformers 4.57:
/// <see cref="Layout.V4"/> means the on-disk checkpoint layout, which save_pretrained writes in the original names:
/// <c>vision_tower.encoder.blocks.{i}</c> with a fused <c>wqkv</c>, <c>wo</c>, <c>norm0/1</c>, <c>mlp.fc0/1</c>,
/// <c>mm_projector.proj.0/2</c>, and the language model as <c>language_model.model</c> with its "layers" renamed
/// "blocks" (the blocks→layers rule is reversed on every key).
/// </summary>
internal sealed class KimiK25Family : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["kimi_k25"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var textJson = c.Json["text_config"] is JsonObject t ? (JsonObject)t.DeepClone() : new JsonObject();
        // Kimi_K25Config: a missing text_config is DeepSeek-V3's defaults, and model_type "kimi_k2" is deepseek_v3.
        if (textJson["model_type"] is null || (string?)textJson["model_type"] == "kimi_k2") textJson["model_type"] = "deepseek_v3";
        var text = new ModelConfig(textJson, c);
        if (text.ModelType == "kimi_k25") throw new ConfigException("text_config of a kimi_k25 config cannot itself be kimi_k25");
        var lm = ArchitectureRegistry.Build(text, layout);
        var vision = Blocks.SubOrDefaults(c, "vision_config");
        var tie = c.Bool("tie_word_embeddings", true);

        var b = new TreeBuilder("Kimi_K25ForConditionalGeneration", layout);
        if (layout == Layout.V5)
        {
            using (b.Scope("model", "Kimi_K25Model"))
            {
                Vision(b, vision, layout);
                Blocks.Graft(b, lm.Tree, "model", "language_model");
                Projector(b, c, vision, lm.HiddenSize, v4: false);
            }
            b.Linear("lm_head", lm.HiddenSize, lm.VocabSize, location: ModuleLocation.LmHead,
                tiedWeightTo: tie ? "model.language_model.embed_tokens.weight" : null);
        }
        else
        {
            CheckpointVision(b, vision);
            using (b.Scope("language_model", lm.Tree.Root.ClassName))
            {
                Blocks.Graft(b, lm.Tree, "model", "model", name => name.Replace("layers", "blocks", StringComparison.Ordinal));
                b.Linear("lm_head", lm.HiddenSize, lm.VocabSize, location: ModuleLocation.LmHead,
                    tiedWeightTo: tie ? "language_model.model.embed_tokens.weight" : null);
            }
            Projector(b, c, vision, lm.HiddenSize, v4: true);
        }

        var spec = Blocks.MultimodalSpec(c, text, "kimi_k25", b.Build(), lm.Moe, lm.HiddenSize, lm.NumHiddenLayers, lm.VocabSize,
            lm.NumAttentionHeads, lm.NumKeyValueHeads, tie, lm.HiddenAct);
        if (lm.Runtime is not { } textRuntime)
            return spec with { RuntimeUnavailable = $"the Kimi K2.5 language model ({text.ModelType}): {lm.RuntimeUnavailable}" };
        if (textRuntime.Towers is not null || textRuntime.PlaceholderIds is not null)
            return spec with { RuntimeUnavailable = $"a Kimi K2.5 language model ({text.ModelType}) that is itself multimodal" };
        return spec with { Runtime = TextOnlyRuntime(textRuntime, tie, [c.Int("image_token_id", 163605), c.Int("video_token_id", 163840)]) };
    }

    /// <summary>
    /// Kimi_K25ForConditionalGeneration run on text, as transformers runs it without pixel_values: the vision tower and
    /// the projector are never called, and Kimi_K25Model hands the embeddings to its language model with the caller's
    /// (here default) position ids, so the text forward is the language model's own (its family's runtime settings).
    /// The root lm_head ties by Kimi_K25Config's tie_word_embeddings, not the text config's. The projector is registered
    /// after the language model. Image and video placeholder ids embed as id 0 (Kimi_K25Model.forward zeroes them before
    /// the embedding, pixel values or not). On load transformers also permutes the vision q_proj/k_proj rows for its rope
    /// (PermuteForRope after chunking wqkv); the runtime keeps them in stored order, which no text forward reads and
    /// merge writes back unchanged.
    /// </summary>
    private static DecoderRuntime TextOnlyRuntime(DecoderRuntime text, bool tie, IReadOnlyList<long> placeholderIds) => text with
    {
        TieWordEmbeddings = tie,
        PlaceholderIds = placeholderIds,
        Towers = new InertTowers(["model.vision_tower", "model.language_model", "model.mm_projector", "lm_head"],
            "model.language_model", "lm_head"),
    };

    private sealed record VisionShape(long Hidden, long Inter, long Layers, long Patch, long PosH, long PosW, long MergedHidden);

    /// <summary>Kimi_K25VisionConfig's fields (defaults 5.17).</summary>
    private static VisionShape Read(ModelConfig v)
    {
        var hidden = v.Positive("hidden_size", 1152);
        var merge = v.IntList("merge_kernel_size") ?? [2, 2];
        if (merge.Count != 2) throw new ConfigException("vision_config field 'merge_kernel_size' must hold two integers");
        return new(hidden, v.Positive("intermediate_size", 4304), v.Positive("num_hidden_layers", 27), v.Positive("patch_size", 14),
            v.Positive("pos_emb_height", 64), v.Positive("pos_emb_width", 64), hidden * merge[0] * merge[1]);
    }

    private static void Vision(TreeBuilder b, ModelConfig v, Layout layout)
    {
        var s = Read(v);
        var actClass = Blocks.ActivationClass(v.String("hidden_act", "gelu_pytorch_tanh")!, layout);
        using (b.Scope("vision_tower", "Kimi_K25VisionModel", ModuleLocation.Vision))
        {
            using (b.Scope("patch_embed", "Kimi_K25VisionPatchEmbed"))
            {
                Blocks.Conv(b, "proj", "Conv2d", 3, s.Hidden, true, s.Patch, s.Patch);
                using (b.Scope("pos_emb", "Kimi_K25VisionPositionEmbeddings"))
                    b.Param("position_embeddings", s.PosH, s.PosW, s.Hidden);
            }
            b.Leaf("rotary_emb", "Kimi_K25VisionRotaryEmbedding");
            b.ModuleList("layers", s.Layers, j =>
            {
                using (b.Scope(j.ToString(System.Globalization.CultureInfo.InvariantCulture), "Kimi_K25VisionEncoderLayer", layer: j))
                {
                    b.LayerNorm("norm1", s.Hidden);
                    b.LayerNorm("norm2", s.Hidden);
                    using (b.Scope("attn", "Kimi_K25VisionAttention"))
                    {
                        b.Linear("proj", s.Hidden, s.Hidden, true);
                        b.Linear("q_proj", s.Hidden, s.Hidden, true);
                        b.Linear("k_proj", s.Hidden, s.Hidden, true);
                        b.Linear("v_proj", s.Hidden, s.Hidden, true);
                    }
                    using (b.Scope("mlp", "Kimi_K25VisionMLP"))
                    {
                        b.Linear("fc1", s.Hidden, s.Inter, true);
                        b.Leaf("act", actClass);
                        b.Linear("fc2", s.Inter, s.Hidden, true);
                    }
                }
            });
            b.LayerNorm("final_layernorm", s.Hidden);
        }
    }

    /// <summary>The vision tower as save_pretrained writes it (the conversion mapping reversed).</summary>
    private static void CheckpointVision(TreeBuilder b, ModelConfig v)
    {
        var s = Read(v);
        using (b.Scope("vision_tower", "Kimi_K25VisionModel", ModuleLocation.Vision))
        {
            using (b.Scope("patch_embed", "Kimi_K25VisionPatchEmbed"))
            using (b.Scope("pos_emb", "Kimi_K25VisionPositionEmbeddings"))
                b.Param("weight", s.PosH, s.PosW, s.Hidden);
            using (b.Scope("encoder", "Module"))
            {
                using (b.Scope("patch_embed", "Kimi_K25VisionPatchEmbed"))
                    Blocks.Conv(b, "proj", "Conv2d", 3, s.Hidden, true, s.Patch, s.Patch);
                b.ModuleList("blocks", s.Layers, j =>
                {
                    using (b.Scope(j.ToString(System.Globalization.CultureInfo.InvariantCulture), "Kimi_K25VisionEncoderLayer", layer: j))
                    {
                        b.LayerNorm("norm0", s.Hidden);
                        b.LayerNorm("norm1", s.Hidden);
                        b.Linear("wqkv", s.Hidden, 3 * s.Hidden, true);
                        b.Linear("wo", s.Hidden, s.Hidden, true);
                        using (b.Scope("mlp", "Kimi_K25VisionMLP"))
                        {
                            b.Linear("fc0", s.Hidden, s.Inter, true);
                            b.Linear("fc1", s.Inter, s.Hidden, true);
                        }
                    }
                });
                b.LayerNorm("final_layernorm", s.Hidden);
            }
        }
    }

    /// <summary>
    /// Kimi_K25MultimodalProjection. In the checkpoint layout in_proj/out_proj are <c>mm_projector.proj.0/2</c> at the root
    /// while pre_norm keeps its runtime name <c>model.mm_projector.pre_norm</c> (no rule renames it).
    /// </summary>
    private static void Projector(TreeBuilder b, ModelConfig c, ModelConfig vision, long textHidden, bool v4)
    {
        var merged = Read(vision).MergedHidden;
        var preNorm = c.Positive("projection_hidden_size", 1152);
        if (!v4)
        {
            using (b.Scope("mm_projector", "Kimi_K25MultimodalProjection", ModuleLocation.Projector))
            {
                b.LayerNorm("pre_norm", preNorm);
                b.Linear("in_proj", merged, merged, true);
                b.Leaf("act", "GELU");
                b.Linear("out_proj", merged, textHidden, true);
            }
            return;
        }
        using (b.Scope("mm_projector", "Kimi_K25MultimodalProjection", ModuleLocation.Projector))
        using (b.Scope("proj", "Sequential"))
        {
            b.Linear("0", merged, merged, true);
            b.Linear("2", merged, textHidden, true);
        }
        using (b.Scope("model", "Kimi_K25Model"))
        using (b.Scope("mm_projector", "Kimi_K25MultimodalProjection", ModuleLocation.Projector))
            b.LayerNorm("pre_norm", preNorm);
    }
}
