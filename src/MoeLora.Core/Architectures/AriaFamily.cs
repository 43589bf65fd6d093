using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Aria (<c>aria</c>: <c>AriaForConditionalGeneration</c>, no causal-LM class; <c>aria_text</c>:
/// <c>AriaTextForCausalLM</c>). Every decoder layer is MoE: an nn.Linear router (so all-linear and <c>router</c>
/// reach it), <c>moe_num_experts</c> experts held by two <c>AriaGroupedExpertsGemm</c> modules (fc1 weight
/// [E, H, 2I], fc2 weight [E, I, H], stored (E, in, out) without is_transposed, so PEFT swaps in and out), and one
/// shared MLP of <c>moe_num_shared_experts · intermediate_size</c>. The multimodal model nests an Idefics3 vision
/// tower, the Aria projector (learned queries, cross-attention with an nn.MultiheadAttention, an MLP to the text
/// width) and <c>model.language_model</c>; the runtime runs it on text, the tower and projector built but never run.
/// <para>
/// <see cref="Layout.V4"/> is the on-disk layout: the same modules, but the multimodal checkpoint keeps the Llava
/// names transformers 5 converts from (<c>vision_tower.*</c>, <c>multi_modal_projector.*</c>,
/// <c>language_model.model.*</c>, <c>language_model.lm_head</c>), as 4.57's runtime did.
/// </para>
/// </summary>
internal sealed class AriaFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["aria", "aria_text"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var multimodal = c.ModelType == "aria";
        var text = multimodal ? Blocks.SubOrDefaults(c, "text_config") : c;
        // Defaults: AriaTextConfig.
        var vocab = text.Positive("vocab_size", 32000);
        var hidden = text.Positive("hidden_size", 4096);
        var inter = text.Positive("intermediate_size", 4096);
        var layers = text.Positive("num_hidden_layers", 32);
        var heads = text.Positive("num_attention_heads", 32);
        var kv = text.IntOrNull("num_key_value_heads", null) ?? heads;
        var headDim = Blocks.HeadDim(text, hidden, heads);
        var experts = text.Positive("moe_num_experts", 8);
        var topK = text.Positive("moe_topk", 2);
        var shared = text.Int("moe_num_shared_experts", 2);
        var attnBias = text.Bool("attention_bias", false);
        var mlpBias = text.Bool("mlp_bias", false);
        var act = text.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var tie = (multimodal ? c : text).Bool("tie_word_embeddings", false);

        var b = new TreeBuilder(multimodal ? "AriaForConditionalGeneration" : "AriaTextForCausalLM", layout);
        void Layer(int i)
        {
            Blocks.Attention(b, "AriaTextAttention", hidden, heads, kv, headDim, attnBias, attnBias);
            using (b.Scope("mlp", "AriaTextMoELayer", ModuleLocation.Other))
            {
                b.Linear("router", hidden, experts, location: ModuleLocation.Router);
                using (b.Scope("experts", "AriaExperts", ModuleLocation.RoutedExpert))
                {
                    GroupedGemm(b, "fc1", experts, hidden, 2 * inter);
                    GroupedGemm(b, "fc2", experts, inter, hidden);
                }
                Blocks.GatedMlp(b, "shared_experts", "AriaSharedExpertsMLP", hidden, inter * shared, mlpBias, actClass,
                    ModuleLocation.SharedExpert);
            }
            b.RmsNorm("input_layernorm", "AriaTextRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "AriaTextRMSNorm", hidden, ModuleLocation.Norm);
        }
        void TextModel(string attr) => Blocks.TextModel(b, attr, "AriaTextModel", "AriaTextDecoderLayer", vocab, hidden,
            layers, Layer, "AriaTextRMSNorm", "AriaTextRotaryEmbedding");

        string textModel, lmHead;
        if (!multimodal)
        {
            (textModel, lmHead) = ("model", "lm_head");
            TextModel(textModel);
            Blocks.LmHead(b, hidden, vocab, tie, textModel + ".embed_tokens");
        }
        else if (layout == Layout.V5)
        {
            (textModel, lmHead) = ("model.language_model", "lm_head");
            using (b.Scope("model", "AriaModel"))
            {
                VisionAndProjector(b, c, hidden, layout);
                TextModel("language_model");
            }
            Blocks.LmHead(b, hidden, vocab, tie, textModel + ".embed_tokens");
        }
        else
        {
            (textModel, lmHead) = ("language_model.model", "language_model.lm_head");
            VisionAndProjector(b, c, hidden, layout);
            using (b.Scope("language_model", "AriaTextForCausalLM"))
            {
                TextModel("model");
                Blocks.LmHead(b, hidden, vocab, tie, "language_model.model.embed_tokens");
            }
        }

        // The towers sit beside the text model: model.vision_tower in transformers 5, vision_tower on disk.
        var towerRoot = layout == Layout.V5 ? "model." : "";
        var moe = new MoeFacts(experts, topK, shared, inter, inter * shared, Enumerable.Range(0, (int)layers).ToList(), [],
            $"top-{topK} of {experts} router logits, softmax over those {topK}, plus {shared} shared experts (one MLP)");
        return Blocks.NestedSpec(c, text, c.ModelType!, b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act, textModel,
            lmHead) with
        {
            // The multimodal class runs text only (no pixel_values: transformers never calls the vision tower): its tower
            // and projector are built inert, the text model at its path.
            Runtime = Runtime(text, vocab, hidden, layers, heads, kv, headDim, attnBias, experts, topK, shared, inter,
                mlpBias, act, tie) with
            {
                Towers = multimodal ? InertTowers.Before([towerRoot + "vision_tower", towerRoot + "multi_modal_projector"],
                    textModel, lmHead) : null,
            },
        };
    }

    /// <summary>
    /// AriaTextForCausalLM as runtime settings: Llama attention (attention_bias on q/k/v/o), pre-norm RMSNorm layers,
    /// an nn.Linear router (top-k of the logits, softmax over those k in the logits' dtype), grouped-GEMM experts and
    /// an ungated shared MLP added to the routed output.
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig c, long vocab, long hidden, long layers, long heads, long kv, long headDim,
        bool attnBias, long experts, long topK, long shared, long inter, bool mlpBias, string act, bool tie)
    {
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6));
        var moe = new MoeSettings(
            new TopKLogitsRouterSettings("router", experts, topK, TopKScore.Softmax, NormTopK: false, LogitsInFp32: false, LinearModule: true),
            new ExpertsSettings(ExpertsLayout.GroupedGemmInOut, experts, inter, "silu"),
            new SharedExpertSettings("shared_experts", inter * shared, act, null, Bias: mlpBias), MoeOrder.RouterFirst);
        var layer = new DecoderLayerRuntime(
            new StandardAttentionSettings(heads, kv, headDim, attnBias, attnBias, QkNormKind.None, norm.Eps, Sinks: false, MaskSettings.Full,
                RotaryDim: headDim),
            "mlp", moe, norm, norm);
        return new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, RopeSettings.Read(c, 10000.0, headDim),
            Enumerable.Repeat(layer, (int)layers).ToList());
    }

    /// <summary>AriaGroupedExpertsGemm: one weight [E, in, out] for all experts (not an nn.Linear).</summary>
    private static void GroupedGemm(TreeBuilder b, string name, long experts, long inF, long outF)
    {
        using (b.Scope(name, "AriaGroupedExpertsGemm", kind: ModuleKind.Experts, numExperts: experts))
            b.Param("weight", experts, inF, outF);
    }

    /// <summary>The Idefics3 vision tower (<c>vision_tower</c>) and the Aria projector (<c>multi_modal_projector</c>).</summary>
    private static void VisionAndProjector(TreeBuilder b, ModelConfig c, long textHidden, Layout layout)
    {
        // Defaults: Idefics3VisionConfig, the only vision config AriaConfig builds.
        var v = Blocks.SubOrDefaults(c, "vision_config");
        var hv = v.Positive("hidden_size", 1152);
        var iv = v.Positive("intermediate_size", 3072);
        var vLayers = v.Int("num_hidden_layers", 12);
        var channels = v.Positive("num_channels", 3);
        var image = v.Positive("image_size", 224);
        var patch = v.Positive("patch_size", 32);
        var vAct = Blocks.ActivationClass(v.String("hidden_act", "gelu_pytorch_tanh")!, layout);
        var queries = QueryCount(c);

        using (b.Scope("vision_tower", "Idefics3VisionTransformer", ModuleLocation.Vision))
        {
            using (b.Scope("embeddings", "Idefics3VisionEmbeddings"))
            {
                using (b.Scope("patch_embedding", "Conv2d", kind: ModuleKind.Other))
                {
                    b.Param("weight", hv, channels, patch, patch);
                    b.Param("bias", hv);
                }
                b.Embedding("position_embedding", (image / patch) * (image / patch), hv, ModuleLocation.Vision);
            }
            using (b.Scope("encoder", "Idefics3Encoder"))
            {
                b.ModuleList("layers", vLayers, j =>
                {
                    using (b.Scope(j.ToString(System.Globalization.CultureInfo.InvariantCulture), "Idefics3EncoderLayer"))
                    {
                        Blocks.VisionSelfAttention(b, "self_attn", "Idefics3VisionAttention", hv);
                        b.LayerNorm("layer_norm1", hv);
                        using (b.Scope("mlp", "Idefics3VisionMLP"))
                        {
                            b.Leaf("activation_fn", vAct);
                            b.Linear("fc1", hv, iv, bias: true);
                            b.Linear("fc2", iv, hv, bias: true);
                        }
                        b.LayerNorm("layer_norm2", hv);
                    }
                });
            }
            b.LayerNorm("post_layernorm", hv);
        }
        using (b.Scope("multi_modal_projector", "AriaProjector", ModuleLocation.Projector))
        {
            b.Param("query", queries, hv);
            using (b.Scope("cross_attn", "AriaCrossAttention"))
            {
                b.Linear("q_proj", hv, hv);
                b.Linear("k_proj", hv, hv);
                b.Linear("v_proj", hv, hv);
                // nn.MultiheadAttention: PEFT could wrap it, but all-linear only selects its out_proj.
                using (b.Scope("multihead_attn", "MultiheadAttention", kind: ModuleKind.Other))
                {
                    b.Param("in_proj_weight", 3 * hv, hv);
                    b.Param("in_proj_bias", 3 * hv);
                    b.Linear("out_proj", hv, hv, bias: true, className: "NonDynamicallyQuantizableLinear");
                }
                b.Linear("linear", hv, hv, bias: true);
                b.Leaf("dropout", "Dropout");
                b.LayerNorm("layer_norm", hv);
                b.LayerNorm("layer_norm_kv", hv);
            }
            b.LayerNorm("layer_norm", hv);
            using (b.Scope("feed_forward", "AriaProjectorMLP"))
            {
                b.Linear("linear_in", hv, textHidden);
                b.Linear("linear_out", textHidden, textHidden);
                b.Leaf("act", "NewGELUActivation");
            }
        }
    }

    /// <summary>The projector's learned queries: the largest value of <c>projector_patch_to_query_dict</c> ({1225: 128, 4900: 256}).</summary>
    private static long QueryCount(ModelConfig c)
    {
        var dict = c.Sub("projector_patch_to_query_dict");
        if (dict is null) return 256;
        var values = dict.Json.Select(kv => dict.Positive(kv.Key, 1)).ToList();
        if (values.Count == 0) throw new ConfigException("config field 'projector_patch_to_query_dict' is empty");
        return values.Max();
    }
}
