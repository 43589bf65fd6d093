using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// GLM-4.5V (<c>glm4v_moe</c>), built as AutoModelForImageTextToText builds it: <c>Glm4vMoeForConditionalGeneration</c>
/// with <c>model.visual</c> (the GLM-4V vision tower: Conv3d patch embedding, <c>depth</c> blocks with a fused qkv and a
/// gated MLP of width <c>out_hidden_size</c>, a Conv2d downsample and the <c>merger</c> projecting into the text width),
/// <c>model.language_model</c> (GLM-4.5's text model: q/k/v bias per <c>attention_bias</c>, the first
/// <c>first_k_dense_replace</c> layers dense, the rest DeepSeek-V3-style MoE) and a root <c>lm_head</c>.
/// <see cref="Layout.V4"/> is the checkpoint layout: the same names with per-expert
/// <c>experts.{e}.gate_proj/up_proj/down_proj</c> (a ModuleList of Glm4vMoeTextMLP).
/// </summary>
internal sealed class Glm4vMoeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["glm4v_moe"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Glm4vMoeConfig builds a missing sub-config from the root's remaining keys.
        var text = c.Sub("text_config") ?? c;
        var vision = c.Sub("vision_config") ?? c;
        // Defaults: Glm4vMoeTextConfig (5.17).
        var vocab = text.Positive("vocab_size", 151424);
        var hidden = text.Positive("hidden_size", 4096);
        var inter = text.Positive("intermediate_size", 10944);
        var layers = text.Positive("num_hidden_layers", 46);
        var heads = text.Positive("num_attention_heads", 96);
        var kv = text.IntOrNull("num_key_value_heads", 8) ?? heads;
        var headDim = Blocks.HeadDim(text, hidden, heads);
        var attnBias = text.Bool("attention_bias", true);
        var experts = text.FirstInt("n_routed_experts", "num_local_experts") ?? 128;
        var shared = text.Int("n_shared_experts", 1);
        var topK = text.Positive("num_experts_per_tok", 8);
        var moeInter = text.Positive("moe_intermediate_size", 1408);
        var firstDense = text.Int("first_k_dense_replace", 1);
        // Pre-v5 configs put tie_word_embeddings in text_config; Glm4vMoeConfig forwards a true one to the root.
        var tie = c.Bool("tie_word_embeddings", false) || (text != c && text.Bool("tie_word_embeddings", false));
        var act = text.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var sharedInter = moeInter * shared;

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers, i => i >= firstDense);
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder("Glm4vMoeForConditionalGeneration", layout);
        using (b.Scope("model", "Glm4vMoeModel"))
        {
            Vision(b, vision, layout);
            Blocks.DecoderStack(b, "language_model", "Glm4vMoeTextModel", "Glm4vMoeTextDecoderLayer", "Glm4vMoeRMSNorm",
                "Glm4vMoeTextRotaryEmbedding", vocab, hidden, layers, i =>
                {
                    Blocks.Attention(b, "Glm4vMoeTextAttention", hidden, heads, kv, headDim, attnBias, false);
                    if (moeSet.Contains(i))
                        Blocks.SharedExpertMoe(b, layout, "Glm4vMoeText", "Glm4vMoeTextMoE", experts, hidden, moeInter, sharedInter,
                            actClass, Blocks.ScoreBias.OnRouter);
                    else
                        Blocks.GatedMlp(b, "mlp", "Glm4vMoeTextMLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
                    b.RmsNorm("input_layernorm", "Glm4vMoeTextRMSNorm", hidden, ModuleLocation.Norm);
                    b.RmsNorm("post_attention_layernorm", "Glm4vMoeTextRMSNorm", hidden, ModuleLocation.Norm);
                });
        }
        b.Linear("lm_head", hidden, vocab, location: ModuleLocation.LmHead,
            tiedWeightTo: tie ? "model.language_model.embed_tokens.weight" : null);

        var router = Glm4MoeFamily.Router(text, experts, topK);
        var routing = Blocks.GroupedTopKRouting("sigmoid", true, router.Groups, router.TopKGroups, topK, experts,
            router.NormTopK, router.RoutedScalingFactor);
        var moe = new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers, routing);
        var spec = Blocks.MultimodalSpec(c, text, "glm4v_moe", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        // Runtime: text only, as transformers runs the class given only input_ids: model.visual is never called, and
        // without image/video grids compute_3d_position_ids returns None, so the text model gives all three mrope
        // sections (T, H, W) the positions 0..S-1. Recomposing the cos/sin tables section by section then picks every
        // frequency from identical tables: the plain rope over head_dim·partial_rotary_factor dims, rotate_half over the
        // first rotated dims with the rest passed through (gpt-neox's apply_rotary_pos_emb), as GLM-4.5's decoder does.
        var rotaryDim = Glm4MoeFamily.RotaryDim(text, headDim);
        var sections = MropeSection(text);
        if (sections.Sum() != rotaryDim / 2)
            return spec with
            {
                RuntimeUnavailable = $"mrope_section [{string.Join(", ", sections)}] does not split the {rotaryDim / 2} rotary " +
                    "frequencies (head_dim·partial_rotary_factor/2): transformers' Glm4vMoeTextRotaryEmbedding cannot run it either",
            };
        var runtime = Glm4MoeFamily.Runtime(text, vocab, hidden, inter, layers, heads, kv, headDim, attnBias, qkNorm: false, router,
            moeInter, sharedInter, act, tie, moeSet);
        return spec with { Runtime = runtime with { Towers = InertTowers.Before(["model.visual"], "model.language_model", "lm_head") } };
    }

    /// <summary>
    /// <c>mrope_section</c> of the text rope (Glm4vMoeTextRotaryEmbedding's default 8/12/12): the sizes that
    /// <c>torch.split</c> cuts the inverse frequencies into, so they must sum to their count.
    /// </summary>
    private static IReadOnlyList<long> MropeSection(ModelConfig text) =>
        (text.Sub("rope_parameters") ?? text.Sub("rope_scaling"))?.IntList("mrope_section") ?? [8, 12, 12];

    /// <summary>Glm4vMoeVisionModel (defaults: Glm4vMoeVisionConfig, 5.17).</summary>
    private static void Vision(TreeBuilder b, ModelConfig v, Layout layout)
    {
        var hv = v.Positive("hidden_size", 1536);
        var depth = v.Positive("depth", 24);
        var outHidden = v.Positive("out_hidden_size", 4096);
        var iv = v.Positive("intermediate_size", 13696);
        var channels = v.Positive("in_channels", 3);
        var image = v.Positive("image_size", 336);
        var patch = v.Positive("patch_size", 14);
        var temporal = v.Positive("temporal_patch_size", 2);
        var merge = v.Positive("spatial_merge_size", 2);
        var qkvBias = v.Bool("attention_bias", false);
        var actClass = Blocks.ActivationClass(v.String("hidden_act", "silu")!, layout);

        using (b.Scope("visual", "Glm4vMoeVisionModel", ModuleLocation.Vision))
        {
            using (b.Scope("embeddings", "Glm4vMoeVisionEmbeddings"))
                b.Embedding("position_embedding", (image / patch) * (image / patch), hv, ModuleLocation.Vision);
            using (b.Scope("patch_embed", "Glm4vMoeVisionPatchEmbed"))
                Blocks.Conv(b, "proj", "Conv3d", channels, hv, true, temporal, patch, patch);
            b.Leaf("rotary_pos_emb", "Glm4vMoeVisionRotaryEmbedding");
            b.ModuleList("blocks", depth, j =>
            {
                using (b.Scope(j.ToString(System.Globalization.CultureInfo.InvariantCulture), "Glm4vMoeVisionBlock", layer: j))
                {
                    b.RmsNorm("norm1", "Glm4vMoeRMSNorm", hv);
                    b.RmsNorm("norm2", "Glm4vMoeRMSNorm", hv);
                    using (b.Scope("attn", "Glm4vMoeVisionAttention"))
                    {
                        b.Linear("qkv", hv, 3 * hv, qkvBias);
                        b.Linear("proj", hv, hv);
                    }
                    // transformers' own class name (sic).
                    Blocks.GatedMlp(b, "mlp", "Glm4vMoeisionMlp", hv, outHidden, false, actClass, ModuleLocation.Vision);
                }
            });
            using (b.Scope("merger", "Glm4vMoeVisionPatchMerger", ModuleLocation.Projector))
            {
                b.Linear("proj", outHidden, outHidden);
                b.LayerNorm("post_projection_norm", outHidden);
                b.Linear("gate_proj", outHidden, iv);
                b.Linear("up_proj", outHidden, iv);
                b.Linear("down_proj", iv, outHidden);
                b.Leaf("act1", "GELU");
                b.Leaf("act_fn", actClass);
            }
            b.RmsNorm("post_conv_layernorm", "Glm4vMoeRMSNorm", hv);
            Blocks.Conv(b, "downsample", "Conv2d", hv, outHidden, true, merge, merge);
            b.RmsNorm("post_layernorm", "Glm4vMoeRMSNorm", hv);
        }
    }
}
