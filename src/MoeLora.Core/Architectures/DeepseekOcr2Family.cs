using System.Globalization;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// DeepSeek-OCR-2 (<c>deepseek_ocr2</c>): <c>DeepseekOcr2ForConditionalGeneration</c>, which only
/// AutoModelForImageTextToText builds. Read from transformers' modeling/modular_deepseek_ocr2.py (the stored version
/// may predate 5.17; where 5.17 differs it is noted) and 5.17's checkpoint conversion list:
/// <list type="bullet">
/// <item><c>model.view_separator</c> [text hidden], a parameter of the model itself (first in named_parameters).</item>
/// <item><c>model.vision_tower</c> (DeepseekOcr2VisionModel): <c>sam_encoder</c>, a SAM ViT (pos_embed [1, g, g, w] with
/// g = image_size / patch_size, a Conv2d <c>patch_embed.projection</c>, pre-norm <c>layers</c> with a fused qkv, proj and
/// decomposed relative positions rel_pos_h/w [2·s − 1, head_dim] (s the window, or g in the global_attn_indexes
/// layers), lin1/lin2 MLPs, a 1×1 + 3×3 conv <c>neck</c> and two stride-2 3×3 convs <c>proj</c> to
/// downsample_channels); <c>vision_encoder</c>, a Qwen2 decoder stack without embeddings (q/k/v with bias, o_proj
/// without, gated MLP, RMSNorms); <c>query_768_resolution</c> (144 rows) and <c>query_1024_resolution</c> (256 rows)
/// embeddings of the encoder width.</item>
/// <item><c>model.multi_modal_projector</c>: one nn.Linear (encoder width → text width, with bias).</item>
/// <item><c>model.language_model</c> (DeepseekOcr2TextModel): DeepSeek-V2's MoE and dense MLPs behind Llama
/// attention (q/k/v/o, not MLA), head_dim always hidden / heads (DeepseekOcr2TextConfig.__post_init__ overwrites any
/// head_dim). Which layers are MoE is <c>mlp_layer_types</c> ("sparse"), which has no default: transformers indexes it
/// per layer, so a config without it does not build (refused here).</item>
/// <item>a root <c>lm_head</c>, tied by the top-level tie_word_embeddings (default false).</item>
/// </list>
/// DeepSeek-OCR-2 did not exist in transformers 4.57: <see cref="Layout.V4"/> is the on-disk layout, the original
/// checkpoint's names that save_pretrained writes by reversing the conversion list: <c>model.sam_model.blocks.{j}</c>
/// (norm1, attn, norm2, mlp), <c>model.sam_model.patch_embed.proj</c>, <c>model.sam_model.pos_embed</c>,
/// <c>model.sam_model.neck.0-3</c>, <c>model.sam_model.net_2/net_3</c>, <c>model.qwen2_model.model.model.layers/norm</c>,
/// <c>model.qwen2_model.query_768/query_1024</c>, <c>model.projector.layers</c>, <c>model.view_seperator</c>, the
/// language model as <c>model.embed_tokens/layers/norm</c> with per-expert <c>experts.{e}.gate_proj/up_proj/down_proj</c>.
/// Runtime (V5 layout only): text only, as transformers runs the class given only input_ids (see <see cref="Runtime"/>):
/// the towers, the projector and <c>view_separator</c> are built from this tree and never run.
/// </summary>
internal sealed class DeepseekOcr2Family : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["deepseek_ocr2"];

    private const string P = "DeepseekOcr2";

    /// <summary>DeepseekOcr2SamVisionConfig's fields (defaults of transformers' configuration_deepseek_ocr2.py).</summary>
    private sealed record SamShape(long Hidden, long OutChannels, long Layers, long Heads, long Channels, long Grid, long Patch,
        string ActClass, bool QkvBias, bool AbsPos, bool RelPos, long Window, IReadOnlyList<long> GlobalLayers, long MlpDim,
        long Down0, long Down1)
    {
        public long HeadDim => Hidden / Heads;

        /// <summary>DeepseekOcr2SamVisionAttention's rel_pos rows: 2·window − 1, or 2·grid − 1 in a global layer.</summary>
        public long RelPosRows(int layer) => 2 * (GlobalLayers.Contains(layer) || Window == 0 ? Grid : Window) - 1;
    }

    /// <summary>DeepseekOcr2VisionEncoderConfig's fields (a Qwen2 config).</summary>
    private sealed record EncoderShape(long Hidden, long Inter, long Layers, long Heads, long KvHeads, long HeadDim, string ActClass);

    private sealed record TextShape(long Vocab, long Hidden, long Inter, long MoeInter, long Layers, long Heads, long KvHeads,
        long Experts, long? TopK, long? Shared, bool AttnBias, bool MlpBias, string Act, string ActClass, HashSet<int> MoeSet)
    {
        public long HeadDim => Hidden / Heads;

        /// <summary>transformers 5 builds the shared experts in every MoE layer (DeepSeek-V2's rule, see DeepseekFamily).</summary>
        public long SharedInter => MoeInter * (Shared ?? 0);
    }

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var textConfig = Blocks.SubOrDefaults(c, "text_config");
        var vision = Blocks.SubOrDefaults(c, "vision_config");
        var sam = ReadSam(Blocks.SubOrDefaults(vision, "sam_config"), layout);
        var enc = ReadEncoder(Blocks.SubOrDefaults(vision, "encoder_config"), layout);
        var t = ReadText(textConfig, layout);
        var tie = c.Bool("tie_word_embeddings", false);

        var b = new TreeBuilder(P + "ForConditionalGeneration", layout);
        string textModel;
        if (layout == Layout.V5)
        {
            textModel = "model.language_model";
            using (b.Scope("model", P + "Model"))
            {
                b.Param("view_separator", t.Hidden);
                using (b.Scope("vision_tower", P + "VisionModel", ModuleLocation.Vision))
                {
                    using (b.Scope("sam_encoder", P + "SamVisionEncoder"))
                        SamContents(b, sam, v4: false);
                    using (b.Scope("vision_encoder", P + "VisionEncoder"))
                        EncoderBody(b, enc, rotary: true);
                    b.Embedding("query_768_resolution", 144, enc.Hidden, ModuleLocation.Vision);
                    b.Embedding("query_1024_resolution", 256, enc.Hidden, ModuleLocation.Vision);
                }
                b.Linear("multi_modal_projector", enc.Hidden, t.Hidden, true, location: ModuleLocation.Projector);
                using (b.Scope("language_model", P + "TextModel"))
                    TextBody(b, t, layout);
            }
        }
        else
        {
            // The original checkpoint's DeepseekOCR2Model: the language model's modules at model.*, then the towers.
            textModel = "model";
            using (b.Scope("model", P + "Model"))
            {
                b.Param("view_seperator", t.Hidden);
                TextBody(b, t, layout);
                using (b.Scope("sam_model", P + "SamVisionEncoder", ModuleLocation.Vision))
                    SamContents(b, sam, v4: true);
                using (b.Scope("qwen2_model", "Module", ModuleLocation.Vision))
                {
                    using (b.Scope("model", "Module"))
                    using (b.Scope("model", P + "VisionEncoder"))
                        EncoderBody(b, enc, rotary: false);
                    b.Embedding("query_768", 144, enc.Hidden, ModuleLocation.Vision);
                    b.Embedding("query_1024", 256, enc.Hidden, ModuleLocation.Vision);
                }
                using (b.Scope("projector", "Module", ModuleLocation.Projector))
                    b.Linear("layers", enc.Hidden, t.Hidden, true);
            }
        }
        Blocks.LmHead(b, t.Hidden, t.Vocab, tie, textModel + ".embed_tokens");

        var (moeLayers, denseLayers) = Blocks.SplitLayers(t.Layers, t.MoeSet.Contains);
        var topK = t.TopK ?? 0;
        var method = textConfig.String("topk_method", "greedy");
        var scale = textConfig.Double("routed_scaling_factor", 1.0);
        var routing = $"softmax over {t.Experts} experts in fp32, {method} top-"
            + (t.TopK is null ? "k unset (num_experts_per_tok null: transformers' top-k has no k)" : topK.ToString(CultureInfo.InvariantCulture))
            + $", weights scaled by {scale.ToString(CultureInfo.InvariantCulture)}, not renormalised; plus {t.Shared ?? 0} shared experts (one MLP)";
        var moe = new MoeFacts(t.Experts, topK, t.Shared ?? 0, t.MoeInter, t.SharedInter, moeLayers, denseLayers, routing);
        var spec = Blocks.NestedSpec(c, textConfig, "deepseek_ocr2", b.Build(), moe, t.Hidden, t.Layers, t.Vocab, t.Heads, t.KvHeads,
            tie, t.Act, textModel);
        // The original layout nests the towers inside the text model (model.sam_model beside model.layers), which no
        // module tree of transformers 5 has; the runtime is the transformers-5 model, described by the V5 layout.
        if (layout != Layout.V5)
            return spec with { RuntimeUnavailable = "DeepSeek-OCR-2's original checkpoint layout is not a runtime tree (the runtime is the transformers-5 one)" };

        var (router, missing) = DeepseekFamily.V2Router(textConfig, t.Experts, topK);
        if (router is null) return spec with { RuntimeUnavailable = missing };
        return spec with { Runtime = Runtime(textConfig, t, router, tie) };
    }

    /// <summary>
    /// The text-only forward: DeepseekOcr2Model embeds input_ids and, without pixel_values, hands the embeddings to its
    /// language model unchanged (no image features scattered, view_separator unread, no position ids: the text model's
    /// own 0..S-1). DeepseekOcr2TextModel is DeepseekV2Model with LlamaRotaryEmbedding: pre-norm layers of Llama
    /// attention (gpt-neox rotate_half over the whole head_dim, scale head_dim^-0.5, q/k/v/o biases per attention_bias)
    /// and DeepSeek-V2's dense MLP or MoE (fp32 softmax router, never renormalised, routed_scaling_factor, shared experts
    /// added), no embedding or logits scaling. The towers and view_separator are built from Core's tree, never run.
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig text, TextShape t, SoftmaxGroupLimitedRouterSettings router, bool tie)
    {
        // Every RMSNorm (layers and final) takes rms_norm_eps (DeepseekV2Config's default 1e-6).
        var norm = new NormSettings(NormKind.Rms, text.Double("rms_norm_eps", 1e-6));
        var attention = new StandardAttentionSettings(t.Heads, t.KvHeads, t.HeadDim, t.AttnBias, t.AttnBias, QkNormKind.None,
            norm.Eps, Sinks: false, MaskSettings.Full, RotaryDim: t.HeadDim);
        var sparse = new MoeSettings(router, new ExpertsSettings(ExpertsLayout.GateUpOutIn, t.Experts, t.MoeInter, t.Act),
            new SharedExpertSettings("shared_experts", t.SharedInter, t.Act, SigmoidGateName: null, Bias: t.MlpBias), MoeOrder.ExpertsFirst);
        var dense = new GatedMlpSettings(t.Inter, t.Act, t.MlpBias);
        var layers = Enumerable.Range(0, (int)t.Layers)
            .Select(i => new DecoderLayerRuntime(attention, "mlp", t.MoeSet.Contains(i) ? sparse : dense, norm, norm)).ToList();
        // rope_parameters standardised by PreTrainedConfig (default theta 10000) over head_dim = hidden / heads: the
        // rotary's default init ignores partial_rotary_factor, and the config class overwrites any head_dim.
        return new DecoderRuntime(t.Vocab, t.Hidden, tie, text.Double("initializer_range", 0.02), norm,
            RopeSettings.Read(text, 10000.0, t.HeadDim), layers)
        {
            // view_separator is model's own parameter, so named_parameters lists it before every child of model.
            Towers = InertTowers.Before(["model.view_separator", "model.vision_tower", "model.multi_modal_projector"],
                "model.language_model", "lm_head"),
        };
    }

    private static SamShape ReadSam(ModelConfig s, Layout layout)
    {
        var hidden = s.Positive("hidden_size", 768);
        var heads = s.Positive("num_attention_heads", 12);
        var image = s.Positive("image_size", 1024);
        var patch = s.Positive("patch_size", 16);
        var ratio = s.Double("mlp_ratio", 4.0);
        // __post_init__: mlp_dim = int(hidden_size * mlp_ratio) when null; downsample_channels = [512, 896] when null.
        var mlpDim = s.IntOrNull("mlp_dim", null) ?? (long)(hidden * ratio);
        var down = s.IntList("downsample_channels") ?? [512, 896];
        if (down.Count < 2) throw new ConfigException("sam_config field 'downsample_channels' must hold two widths");
        if (mlpDim <= 0) throw new ConfigException($"sam_config's MLP width (mlp_dim) must be positive, got {mlpDim}");
        return new SamShape(hidden, s.Positive("output_channels", 256), s.Positive("num_hidden_layers", 12), heads,
            s.Positive("num_channels", 3), image / patch, patch, Blocks.ActivationClass(s.String("hidden_act", "gelu")!, layout),
            s.Bool("qkv_bias", true), s.Bool("use_abs_pos", true), s.Bool("use_rel_pos", true), s.Int("window_size", 14),
            s.IntList("global_attn_indexes") ?? [2, 5, 8, 11], mlpDim, down[0], down[1]);
    }

    private static EncoderShape ReadEncoder(ModelConfig e, Layout layout)
    {
        var hidden = e.Positive("hidden_size", 4096);
        var heads = e.Positive("num_attention_heads", 32);
        var kv = e.IntOrNull("num_key_value_heads", 32) ?? heads;
        // DeepseekOcr2VisionAttention: getattr(config, "head_dim", hidden // heads); the config class has no head_dim field.
        var headDim = e.IntOrNull("head_dim", null) ?? hidden / heads;
        return new EncoderShape(hidden, e.Positive("intermediate_size", 22016), e.Positive("num_hidden_layers", 32), heads, kv,
            headDim, Blocks.ActivationClass(e.String("hidden_act", "silu")!, layout));
    }

    private static TextShape ReadText(ModelConfig t, Layout layout)
    {
        var hidden = t.Positive("hidden_size", 4096);
        var heads = t.Positive("num_attention_heads", 32);
        if (hidden % heads != 0)
            throw new ConfigException($"text_config hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads})");
        var layers = t.Positive("num_hidden_layers", 32);
        var types = t.StringList("mlp_layer_types")
            ?? throw new ConfigException("text_config field 'mlp_layer_types' is required: DeepseekOcr2TextConfig has no default and "
                + "transformers indexes it per decoder layer (\"dense\" or \"sparse\")");
        if (types.Count < layers)
            throw new ConfigException($"text_config field 'mlp_layer_types' has {types.Count} entries for {layers} layers");
        var act = t.String("hidden_act", "silu")!;
        return new TextShape(t.Positive("vocab_size", 32000), hidden, t.Positive("intermediate_size", 11008),
            t.Positive("moe_intermediate_size", 1407), layers, heads, t.IntOrNull("num_key_value_heads", null) ?? heads,
            t.FirstInt("n_routed_experts", "num_experts") ?? 64, t.IntOrNull("num_experts_per_tok", null),
            t.IntOrNull("n_shared_experts", 2), t.Bool("attention_bias", false), t.Bool("mlp_bias", false), act,
            Blocks.ActivationClass(act, layout),
            Enumerable.Range(0, (int)layers).Where(i => types[i] == "sparse").ToHashSet());
    }

    /// <summary>The SAM encoder's contents under the current scope; <paramref name="v4"/>: the original checkpoint's names.</summary>
    private static void SamContents(TreeBuilder b, SamShape s, bool v4)
    {
        // pos_embed is the encoder's own parameter, so it precedes its children in named_parameters.
        if (s.AbsPos) b.Param("pos_embed", 1, s.Grid, s.Grid, s.Hidden);
        using (b.Scope("patch_embed", P + "SamPatchEmbeddings"))
            Blocks.Conv(b, v4 ? "proj" : "projection", "Conv2d", s.Channels, s.Hidden, true, s.Patch, s.Patch);
        b.ModuleList(v4 ? "blocks" : "layers", s.Layers, j =>
        {
            using (b.Scope(j.ToString(CultureInfo.InvariantCulture), P + "SamVisionLayer", layer: j))
            {
                b.LayerNorm(v4 ? "norm1" : "layer_norm1", s.Hidden);
                // from_config picks sdpa (DeepseekOcr2PreTrainedModel supports it, not flash attention).
                using (b.Scope("attn", P + "SamVisionSdpaAttention"))
                {
                    if (s.RelPos)
                    {
                        b.Param("rel_pos_h", s.RelPosRows(j), s.HeadDim);
                        b.Param("rel_pos_w", s.RelPosRows(j), s.HeadDim);
                    }
                    b.Linear("qkv", s.Hidden, 3 * s.Hidden, s.QkvBias);
                    b.Linear("proj", s.Hidden, s.Hidden, true);
                }
                b.LayerNorm(v4 ? "norm2" : "layer_norm2", s.Hidden);
                using (b.Scope("mlp", P + "SamMLPBlock"))
                {
                    b.Linear("lin1", s.Hidden, s.MlpDim, true);
                    b.Linear("lin2", s.MlpDim, s.Hidden, true);
                    b.Leaf("act", s.ActClass);
                }
            }
        });
        using (b.Scope("neck", v4 ? "Sequential" : P + "SamVisionNeck"))
        {
            Blocks.Conv(b, v4 ? "0" : "conv1", "Conv2d", s.Hidden, s.OutChannels, false, 1, 1);
            b.LayerNorm(v4 ? "1" : "layer_norm1", s.OutChannels, className: P + "SamLayerNorm");
            Blocks.Conv(b, v4 ? "2" : "conv2", "Conv2d", s.OutChannels, s.OutChannels, false, 3, 3);
            b.LayerNorm(v4 ? "3" : "layer_norm2", s.OutChannels, className: P + "SamLayerNorm");
        }
        if (v4)
        {
            Blocks.Conv(b, "net_2", "Conv2d", s.OutChannels, s.Down0, false, 3, 3);
            Blocks.Conv(b, "net_3", "Conv2d", s.Down0, s.Down1, false, 3, 3);
            return;
        }
        using (b.Scope("proj", P + "SamVisionProj"))
        {
            Blocks.Conv(b, "conv1", "Conv2d", s.OutChannels, s.Down0, false, 3, 3);
            Blocks.Conv(b, "conv2", "Conv2d", s.Down0, s.Down1, false, 3, 3);
        }
    }

    /// <summary>DeepseekOcr2VisionEncoder's contents (a Qwen2Model without embed_tokens) under the current scope.</summary>
    private static void EncoderBody(TreeBuilder b, EncoderShape e, bool rotary)
    {
        b.ModuleList("layers", e.Layers, k =>
        {
            using (b.Scope(k.ToString(CultureInfo.InvariantCulture), P + "VisionEncoderLayer", layer: k))
            {
                using (b.Scope("self_attn", P + "VisionAttention"))
                {
                    b.Linear("q_proj", e.Hidden, e.Heads * e.HeadDim, true);
                    b.Linear("k_proj", e.Hidden, e.KvHeads * e.HeadDim, true);
                    b.Linear("v_proj", e.Hidden, e.KvHeads * e.HeadDim, true);
                    b.Linear("o_proj", e.Heads * e.HeadDim, e.Hidden, false);
                }
                using (b.Scope("mlp", P + "VisionMLP"))
                {
                    b.Linear("gate_proj", e.Hidden, e.Inter);
                    b.Linear("up_proj", e.Hidden, e.Inter);
                    b.Linear("down_proj", e.Inter, e.Hidden);
                    b.Leaf("act_fn", e.ActClass);
                }
                b.RmsNorm("input_layernorm", P + "VisionRMSNorm", e.Hidden);
                b.RmsNorm("post_attention_layernorm", P + "VisionRMSNorm", e.Hidden);
            }
        });
        b.RmsNorm("norm", P + "VisionRMSNorm", e.Hidden);
        if (rotary) b.Leaf("rotary_emb", P + "VisionRotaryEmbedding");
    }

    /// <summary>DeepseekOcr2TextModel's contents under the current scope (embed_tokens, layers, norm, rotary_emb).</summary>
    private static void TextBody(TreeBuilder b, TextShape t, Layout layout)
    {
        const string T = P + "Text";
        Blocks.DecoderStack(b, T, t.Vocab, t.Hidden, t.Layers, i =>
        {
            Blocks.Attention(b, T + "Attention", t.Hidden, t.Heads, t.KvHeads, t.HeadDim, t.AttnBias, t.AttnBias);
            if (t.MoeSet.Contains(i))
            {
                using (b.Scope("mlp", T + "Moe", ModuleLocation.Other))
                {
                    // Registered experts, gate, shared_experts (DeepseekOcr2TextMoe is DeepseekV2Moe). The stored modeling
                    // file has an nn.Linear gate, but 5.17's DeepseekV2Moe holds a TopkRouter module (weight [E, H], see the
                    // deepseek_v2 oracle), which the generated class copies; the checkpoint stores it as mlp.gate.weight.
                    Blocks.Experts(b, layout, T, t.Experts, t.Hidden, t.MoeInter, t.ActClass, Blocks.ExpertNames.Proj, T + "MLP");
                    Blocks.Router(b, layout, "gate", T + "TopkRouter", t.Experts, t.Hidden);
                    Blocks.GatedMlp(b, "shared_experts", T + "MLP", t.Hidden, t.SharedInter, t.MlpBias, t.ActClass, ModuleLocation.SharedExpert);
                }
            }
            else
            {
                Blocks.GatedMlp(b, "mlp", T + "MLP", t.Hidden, t.Inter, t.MlpBias, t.ActClass, ModuleLocation.Mlp);
            }
            b.RmsNorm("input_layernorm", T + "RMSNorm", t.Hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", T + "RMSNorm", t.Hidden, ModuleLocation.Norm);
        }, rotary: layout == Layout.V5);
    }
}
