using System.Globalization;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// ERNIE 4.5 VL MoE (<c>ernie4_5_vl_moe</c>), built as AutoModelForImageTextToText builds it:
/// <c>Ernie4_5_VLMoeForConditionalGeneration</c> with <c>model.language_model</c> (ERNIE 4.5's decoder: Llama attention
/// with <c>use_bias</c> on every projection, layer i MoE when <c>mlp_layer_types[i] == "sparse"</c>), then
/// <c>model.vision_tower</c> (a linear patch embedding, <c>depth</c> pre-LayerNorm blocks with a fused qkv and a fc1/fc2
/// MLP, a final LayerNorm <c>ln</c>), then <c>model.resampler_model</c> (spatial and temporal fc1/GELU/fc2/LayerNorm
/// stages over merged patches, a Linear into the text width and an RMSNorm), and a root <c>lm_head</c> tied by the
/// top-level <c>tie_word_embeddings</c>.
/// <para>
/// The MoE block is modality-isolated: <c>text_moe</c> and <c>vision_moe</c> are each a sparse block (a TopK router with
/// its <c>moe_statics</c>, then fused experts) of <c>moe_num_experts</c> experts, the text ones of width
/// <c>moe_intermediate_size[0]</c>, the vision ones of width <c>moe_intermediate_size[1]</c>; then one shared MLP of
/// width <c>moe_intermediate_size[0]·moe_num_shared_experts</c> (none when 0).
/// </para>
/// <para>
/// <see cref="Layout.V4"/> is what transformers 5.17's save_pretrained writes: its conversion mapping reversed.
/// The text model sits at <c>model</c> (<c>model.embed_tokens</c>, <c>model.layers</c>, <c>model.norm</c>), the tower at
/// <c>model.vision_model</c>, the resampler stages as Sequential indices (<c>fc1</c>/<c>fc2</c>/<c>ln</c> →
/// <c>0</c>/<c>2</c>/<c>3</c>). Each MoE block stores <c>gate.weight</c> (text) and <c>gate.weight_1</c> (vision) transposed to
/// [H, E], one <c>moe_statics.e_score_correction_bias</c> [2, E] (text row, then vision row) and one per-expert list
/// <c>experts.{0..2E-1}</c>, the text experts first. <see cref="CheckpointLayout"/> pairs them with the runtime's
/// (<see cref="ModelSpec.CheckpointRoutersTransposed"/> for the routers, a row split for the statics).
/// </para>
/// <para>
/// The runtime runs text only, as transformers does given only input_ids and attention_mask: the vision tower and the
/// resampler are inert parameters, every token goes to <c>text_moe</c> (<c>vision_moe</c> is built, loaded and saved but
/// never run), and the pre-rotated 3-D rope, all three position rows being 0..S-1, is ERNIE 4.5's adjacent-pair rope.
/// A config whose rope transformers cannot build (a non-default type, or <c>mrope_section</c> not [h, h, t>0] summing to
/// head_dim/2) has no runtime.
/// </para>
/// </summary>
internal sealed class Ernie45VLMoeFamily : IArchitecture
{
    private const string P = "Ernie4_5_VLMoe";

    public IReadOnlyList<string> ModelTypes => ["ernie4_5_vl_moe"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Ernie4_5_VLMoeConfig builds a missing text_config from the root's remaining keys, a missing vision_config
        // from its defaults.
        var text = c.Sub("text_config") ?? c;
        var vision = VisionDims.Read(Blocks.SubOrDefaults(c, "vision_config"), layout);
        // Defaults: Ernie4_5_VLMoeTextConfig (5.17); num_experts and num_experts_per_tok are attribute_map aliases.
        var vocab = text.Positive("vocab_size", 103424);
        var hidden = text.Positive("hidden_size", 2560);
        var inter = text.Positive("intermediate_size", 12288);
        var layers = text.Positive("num_hidden_layers", 28);
        var heads = text.Positive("num_attention_heads", 20);
        var kv = text.IntOrNull("num_key_value_heads", 4) ?? heads;
        // Ernie4_5_VLMoeTextAttention: getattr(config, "head_dim", hidden // heads); the config class has no head_dim field.
        var headDim = Blocks.HeadDim(text, hidden, heads);
        var bias = text.Bool("use_bias", false);
        var act = text.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var experts = text.FirstInt("moe_num_experts", "num_experts") ?? 64;
        var topK = text.FirstInt("moe_k", "num_experts_per_tok") ?? 6;
        var shared = text.Int("moe_num_shared_experts", 2);
        var (textInter, visionInter) = MoeIntermediate(text);
        var sharedInter = textInter * shared;
        var mlpTypes = text.StringList("mlp_layer_types")
            ?? ["dense", .. Enumerable.Repeat("sparse", (int)layers - 1)];
        if (mlpTypes.Count < layers)
            throw new ConfigException($"config field 'mlp_layer_types' has {mlpTypes.Count} entries for {layers} layers");
        // Only the root's tie_word_embeddings (default true) ties lm_head to model.language_model.embed_tokens.
        var tie = c.Bool("tie_word_embeddings", true);

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers, i => mlpTypes[i] == "sparse");
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder(P + "ForConditionalGeneration", layout);
        using (b.Scope("model", P + "Model"))
        {
            void Layer(int i)
            {
                Blocks.Attention(b, P + "TextAttention", hidden, heads, kv, headDim, bias, bias);
                if (!moeSet.Contains(i))
                    Blocks.GatedMlp(b, "mlp", P + "MLP", hidden, inter, bias, actClass, ModuleLocation.Mlp);
                else
                    MoeBlock(b, layout, experts, hidden, textInter, visionInter, shared > 0 ? sharedInter : 0, bias, actClass);
                b.RmsNorm("input_layernorm", P + "RMSNorm", hidden, ModuleLocation.Norm);
                b.RmsNorm("post_attention_layernorm", P + "RMSNorm", hidden, ModuleLocation.Norm);
            }

            if (layout == Layout.V5)
            {
                Blocks.TextModel(b, "language_model", P + "TextModel", P + "DecoderLayer", vocab, hidden, layers, Layer,
                    P + "RMSNorm", P + "TextRotaryEmbedding");
            }
            else
            {
                // The checkpoint's text model is model itself (the reversed renamings drop "language_model.").
                Blocks.DecoderStack(b, P, vocab, hidden, layers, Layer, normClass: P + "RMSNorm", rotary: false);
            }
            VisionTower(b, vision, layout);
            Resampler(b, vision, hidden, layout);
        }
        var textModel = layout == Layout.V5 ? "model.language_model" : "model";
        Blocks.LmHead(b, hidden, vocab, tie, textModel + ".embed_tokens");

        var moe = new MoeFacts(experts, topK, shared, textInter, shared > 0 ? sharedInter : 0, moeLayers, denseLayers,
            $"modality-isolated: text tokens go to text_moe ({experts} experts of width {textInter}), image/video tokens to " +
            $"vision_moe ({experts} experts of width {visionInter}); each takes softmax over its experts, top-{topK} picked on " +
            "scores + moe_statics.e_score_correction_bias, renormalised");
        var spec = Blocks.NestedSpec(c, text, "ernie4_5_vl_moe", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act, textModel) with
        {
            // gate.weight / gate.weight_1 are stored [H, E]; the [2, E] statics split by rows pairs by structure.
            CheckpointRoutersTransposed = true,
        };

        // Runtime: text only, as transformers runs the class given only input_ids and attention_mask. The vision tower
        // and the resampler are never called. Without image/video grids compute_3d_position_ids returns None and the
        // text model gives all three rope rows (T, H, W) the positions 0..S-1 (not the mask's cumsum: a left-padded
        // row's real tokens start at its padding length, which rope, being relative, does not see). With every row
        // alike, the pre-rotated rope reduces to ERNIE 4.5's: the "pre-rotation" puts the first h + w inverse
        // frequencies' even entries first and odd ones after, the recomposition stacks the h and w sections back
        // pairwise, so each pair j of the head rotates by position · inv_freq[j] of the plain rope over head_dim,
        // adjacent pairs (rotate_half_text) in fp32. Without moe_mm_token_type_ids every token goes to text_moe and
        // vision_moe never runs; the router logits returned are text_moe's. The router, statics and experts are
        // ERNIE 4.5's (same softmax, statics-biased top-k, moe_norm_min renormalisation, fp32 gate and statics).
        var rope = RopeSettings.Read(text, 500000.0, headDim);
        if (RopeProblem(text, rope, headDim) is { } problem) return spec with { RuntimeUnavailable = problem };
        var norm = new NormSettings(NormKind.Rms, text.Double("rms_norm_eps", 1e-5));
        var attention = Ernie45MoeFamily.AttentionSettings(heads, kv, headDim, bias, norm);
        var isolated = new ModalityIsolatedMoeSettings(
            "text_moe", Ernie45MoeFamily.Sparse(text, experts, topK, textInter, act, shared: null),
            "vision_moe", Ernie45MoeFamily.Sparse(text, experts, topK, visionInter, act, shared: null),
            shared > 0 ? new SharedExpertSettings("shared_experts", sharedInter, act, SigmoidGateName: null, Bias: bias) : null);
        var dense = new GatedMlpSettings(inter, act, bias);
        var runtimeLayers = Enumerable.Range(0, (int)layers)
            .Select(i => new DecoderLayerRuntime(attention, "mlp", moeSet.Contains(i) ? isolated : dense, norm, norm)).ToList();
        // lm_head has no bias whatever use_bias says (unlike ERNIE 4.5's causal LM).
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, text.Double("initializer_range", 0.02), norm, rope, runtimeLayers,
                Towers: new InertTowers(["model.language_model", "model.vision_tower", "model.resampler_model", "lm_head"],
                    "model.language_model", "lm_head")),
        };
    }

    /// <summary>
    /// Why transformers' Ernie4_5_VLMoeTextRotaryEmbedding cannot be built for this config (null: it can):
    /// it accepts only the default rope type, and its <c>mrope_section</c> [h, w, t] (default [22, 22, 20]) must cut
    /// the head_dim/2 inverse frequencies into three (sum head_dim/2), with h == w (the h and w tables are stacked
    /// pairwise) and t &gt; 0 (<c>inv_freq[:-t]</c> is empty for t = 0).
    /// </summary>
    private static string? RopeProblem(ModelConfig text, RopeSettings rope, long headDim)
    {
        if (rope.Type != "default")
            return $"rope type '{rope.Type}': transformers' Ernie4_5_VLMoeTextRotaryEmbedding accepts only the default rope";
        var sections = (text.Sub("rope_parameters") ?? text.Sub("rope_scaling"))?.IntList("mrope_section") ?? [22, 22, 20];
        return sections is [var h, var w, var t] && h == w && h >= 0 && t > 0 && h + w + t == headDim / 2 ? null
            : $"mrope_section [{string.Join(", ", sections)}] is not [h, h, t] with t > 0 summing to the {headDim / 2} rotary " +
              "frequencies (head_dim/2): transformers' Ernie4_5_VLMoeTextRotaryEmbedding cannot run it either";
    }

    /// <summary>
    /// <c>moe_intermediate_size</c>: [text experts' width, vision experts' width] (default [1536, 512]); the MoE block
    /// indexes it, so a single number or a one-entry list cannot build.
    /// </summary>
    private static (long Text, long Vision) MoeIntermediate(ModelConfig text)
    {
        var sizes = text.IntList("moe_intermediate_size") ?? [1536, 512];
        if (sizes.Count < 2 || sizes[0] <= 0 || sizes[1] <= 0)
            throw new ConfigException("config field 'moe_intermediate_size' must list the text and vision experts' positive widths, " +
                $"got [{string.Join(", ", sizes)}]");
        return (sizes[0], sizes[1]);
    }

    /// <summary>Ernie4_5_VLMoeMoeBlock as the layout has it (see the class summary).</summary>
    private static void MoeBlock(TreeBuilder b, Layout layout, long experts, long hidden, long textInter, long visionInter,
        long sharedInter, bool bias, string actClass)
    {
        using (b.Scope("mlp", P + "MoeBlock", ModuleLocation.Other))
        {
            if (layout == Layout.V5)
            {
                foreach (var (name, width) in new[] { ("text_moe", textInter), ("vision_moe", visionInter) })
                {
                    using (b.Scope(name, P + "SparseMoeBlock", ModuleLocation.Other))
                    {
                        Ernie45MoeFamily.Router(b, P + "MoeTopKRouter", P + "MoeStatics", experts, hidden);
                        Blocks.FusedExperts(b, P + "MoeExperts", experts, hidden, width, actClass);
                    }
                }
            }
            else
            {
                // The reversed Transpose of each router weight; "weight_1" is the vision router's.
                using (b.Scope("gate", P + "MoeTopKRouter", ModuleLocation.Router, kind: ModuleKind.Router))
                {
                    b.Param("weight", hidden, experts);
                    b.Param("weight_1", hidden, experts);
                }
                // ErnieSplitAndDecoupleTextVisionExperts: the text experts' gate/up/down, then the vision experts'.
                using (b.Scope("experts", "ModuleList", ModuleLocation.RoutedExpert))
                {
                    for (var e = 0; e < 2 * experts; e++)
                        Blocks.GatedMlp(b, e.ToString(CultureInfo.InvariantCulture), P + "MLP", hidden, e < experts ? textInter : visionInter,
                            false, actClass, ModuleLocation.RoutedExpert);
                }
            }
            if (sharedInter > 0)
                Blocks.GatedMlp(b, "shared_experts", P + "MLP", hidden, sharedInter, bias, actClass, ModuleLocation.SharedExpert);
            // Chunk(dim=0) reversed: the text and the vision router's [1, E] rows concatenated.
            if (layout == Layout.V4) Ernie45MoeFamily.Statics(b, P + "MoeStatics", experts, groups: 2);
        }
    }

    /// <summary>The vision config's sizes (defaults: Ernie4_5_VLMoeVisionConfig, 5.17); <see cref="ActClass"/> is the MLP activation's module class.</summary>
    private sealed record VisionDims(long Hidden, long Depth, long Intermediate, long Channels, long Patch, long SpatialMerge,
        long TemporalMerge, string ActClass)
    {
        public static VisionDims Read(ModelConfig v, Layout layout) => new(v.Positive("hidden_size", 1280), v.Int("depth", 32),
            v.Positive("intermediate_size", 4 * 1280), v.Positive("in_channels", 3), v.Positive("patch_size", 14),
            v.Positive("spatial_merge_size", 2), v.Positive("temporal_merge_size", 2),
            Blocks.ActivationClass(v.String("hidden_act", "quick_gelu")!, layout));
    }

    /// <summary>Ernie4_5_VLMoeVisionTransformerPretrainedModel: patch_embed, rotary_pos_emb, blocks, ln.</summary>
    private static void VisionTower(TreeBuilder b, VisionDims v, Layout layout)
    {
        var hv = v.Hidden;
        using (b.Scope(layout == Layout.V5 ? "vision_tower" : "vision_model", P + "VisionTransformerPretrainedModel", ModuleLocation.Vision))
        {
            using (b.Scope("patch_embed", P + "PatchEmbed"))
                b.Linear("proj", v.Channels * v.Patch * v.Patch, hv);
            b.Leaf("rotary_pos_emb", P + "VisionRotaryEmbedding");
            b.ModuleList("blocks", v.Depth, j =>
            {
                using (b.Scope(j.ToString(CultureInfo.InvariantCulture), P + "VisionBlock"))
                {
                    b.LayerNorm("norm1", hv);
                    b.LayerNorm("norm2", hv);
                    using (b.Scope("attn", P + "VisionAttention"))
                    {
                        b.Linear("qkv", hv, 3 * hv, bias: true);
                        b.Linear("proj", hv, hv, bias: true);
                    }
                    // transformers' own class name (no underscore after 4_5, no Moe).
                    using (b.Scope("mlp", "Ernie4_5VLVisionMLP"))
                    {
                        b.Linear("fc1", hv, v.Intermediate, bias: true);
                        b.Leaf("act", v.ActClass);
                        b.Linear("fc2", v.Intermediate, hv, bias: true);
                    }
                }
            });
            b.LayerNorm("ln", hv);
        }
    }

    /// <summary>
    /// Ernie4_5_VLMoeVariableResolutionResamplerModel: spatial_linear over spatial_merge_size² patches, temporal_linear
    /// over temporal_merge_size of those, mlp into the text width, after_norm.
    /// </summary>
    private static void Resampler(TreeBuilder b, VisionDims v, long textHidden, Layout layout)
    {
        var spatialDim = v.Hidden * v.SpatialMerge * v.SpatialMerge;
        var temporalDim = spatialDim * v.TemporalMerge;

        using (b.Scope("resampler_model", P + "VariableResolutionResamplerModel", ModuleLocation.Projector))
        {
            Stage(b, "spatial_linear", spatialDim, spatialDim, layout);
            Stage(b, "temporal_linear", temporalDim, spatialDim, layout);
            b.Linear("mlp", spatialDim, textHidden, bias: true);
            b.RmsNorm("after_norm", P + "RMSNorm", textHidden);
        }
    }

    /// <summary>Ernie4_5_VLMoeVisionMLP: fc1 (in → out), GELU, fc2 (out → out), LayerNorm; the checkpoint's Sequential 0/1/2/3.</summary>
    private static void Stage(TreeBuilder b, string name, long inDim, long outDim, Layout layout)
    {
        var v5 = layout == Layout.V5;
        using (b.Scope(name, v5 ? P + "VisionMLP" : "Sequential"))
        {
            b.Linear(v5 ? "fc1" : "0", inDim, outDim, bias: true);
            b.Leaf(v5 ? "act_fn" : "1", "GELU");
            b.Linear(v5 ? "fc2" : "2", outDim, outDim, bias: true);
            b.LayerNorm(v5 ? "ln" : "3", outDim);
        }
    }
}
