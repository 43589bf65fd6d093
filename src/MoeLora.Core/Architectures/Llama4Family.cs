using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Llama 4 (identical layout in transformers 4.51-5.17). A <c>llama4</c> config builds the class its
/// <c>architectures</c> names (real checkpoints: <c>Llama4ForConditionalGeneration</c>, vision tower, projector, then
/// <c>language_model</c>), else what <c>AutoModelForCausalLM</c> builds: <c>Llama4ForCausalLM</c> over its
/// <c>text_config</c>. <c>llama4_text</c> builds <c>Llama4ForCausalLM</c>. Experts are fused 3-D parameters stored (E, in, out); the
/// router subclasses nn.Linear, so PEFT's all-linear reaches it.
/// </summary>
internal sealed class Llama4Family : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["llama4", "llama4_text"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var composite = c.ModelType == "llama4";
        var multimodal = composite && Blocks.HeadClass(c, "Llama4ForCausalLM", "Llama4ForConditionalGeneration") == "Llama4ForConditionalGeneration";
        var text = composite ? Blocks.SubOrDefaults(c, "text_config") : c;

        var vocab = text.Positive("vocab_size", 202048);
        var hidden = text.Positive("hidden_size", 5120);
        var inter = text.Positive("intermediate_size", 8192);
        var interMlp = text.Positive("intermediate_size_mlp", 16384);
        var layers = text.Positive("num_hidden_layers", 48);
        var heads = text.Positive("num_attention_heads", 40);
        var kv = text.IntOrNull("num_key_value_heads", 8) ?? heads;
        var headDim = text.IntOrNull("head_dim", 128) ?? hidden / heads;
        var experts = text.Positive("num_local_experts", 16);
        var topK = text.Positive("num_experts_per_tok", 1);
        var step = text.Int("interleave_moe_layer_step", 1);
        var useQkNorm = text.Bool("use_qk_norm", true);
        var attnBias = text.Bool("attention_bias", false);
        var tie = text.Bool("tie_word_embeddings", false);
        var act = text.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        var moeLayers = text.IntList("moe_layers")?.Select(x => (int)x).ToList()
            ?? Enumerable.Range(0, (int)layers).Where(i => step > 0 && i >= step - 1 && (i - (step - 1)) % step == 0).ToList();
        var moeSet = moeLayers.ToHashSet();
        var denseLayers = Enumerable.Range(0, (int)layers).Where(i => !moeSet.Contains(i)).ToList();
        var interval = text.Int("no_rope_layer_interval", 4);
        // no_rope_layers[i] true means layer i *uses* rope; an absent or empty list takes the interval default.
        var noRope = text.TruthyList("no_rope_layers") is { Count: > 0 } given ? given
            : Enumerable.Range(0, (int)layers).Select(i => (i + 1) % interval != 0).ToList();

        var b = new TreeBuilder(multimodal ? "Llama4ForConditionalGeneration" : "Llama4ForCausalLM", layout);
        var prefix = "";
        if (multimodal)
        {
            Vision(b, Blocks.SubOrDefaults(c, "vision_config"), hidden);
            // Left open on purpose: everything after this line belongs to language_model.
            _ = b.Scope("language_model", "Llama4ForCausalLM", ModuleLocation.Other);
            prefix = "language_model.";
        }

        Blocks.CausalLm(b, "Llama4Text", vocab, hidden, layers, tie, i =>
        {
            var qkNorm = useQkNorm && i < noRope.Count && noRope[i];
            Blocks.Attention(b, "Llama4TextAttention", hidden, heads, kv, headDim, attnBias, attnBias,
                afterProjections: qkNorm ? bb => bb.Leaf("qk_norm", "Llama4TextL2Norm") : null);
            if (moeSet.Contains(i))
            {
                using (b.Scope("feed_forward", "Llama4TextMoe", ModuleLocation.Other))
                {
                    // Stored (E, in, out), but Llama4TextExperts has no is_transposed attribute, so PEFT treats the
                    // parameters as (E, out, in) and swaps: its LoRA for gate_up_proj gets in = 2I, out = H (checked, 0.21).
                    using (b.Scope("experts", "Llama4TextExperts", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts,
                        numExperts: experts))
                    {
                        b.Param("gate_up_proj", experts, hidden, 2 * inter);
                        b.Param("down_proj", experts, inter, hidden);
                        b.Leaf("act_fn", actClass);
                    }
                    b.Linear("router", hidden, experts, className: "Llama4Router", location: ModuleLocation.Router);
                    Blocks.GatedMlp(b, "shared_expert", "Llama4TextMLP", hidden, inter, false, actClass,
                        ModuleLocation.SharedExpert, actName: "activation_fn");
                }
            }
            else
            {
                Blocks.GatedMlp(b, "feed_forward", "Llama4TextMLP", hidden, interMlp, false, actClass, ModuleLocation.Mlp,
                    actName: "activation_fn");
            }
            b.RmsNorm("input_layernorm", "Llama4TextRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "Llama4TextRMSNorm", hidden, ModuleLocation.Norm);
        }, modelClass: "Llama4TextModel");

        var moe = new MoeFacts(experts, topK, 1, inter, inter, moeLayers, denseLayers,
            $"sigmoid of the top-{topK} router logit of {experts} experts (scales the token before the expert), plus a shared expert");
        // Multimodal checkpoints nest the language model under language_model.; the text config is text_config.
        // A Llama4ForCausalLM built from a llama4 config runs on its text_config, so its config.model_type (which PEFT's
        // tables read) is the text config's.
        var modelType = composite && !multimodal ? text.ModelType ?? "llama4_text" : c.ModelType!;
        return Blocks.Spec(c, modelType, b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            TextConfig = text,
            DecoderLayersPath = prefix + "model.layers",
            InputEmbeddings = prefix + "model.embed_tokens",
            OutputEmbeddings = prefix + "lm_head",
            // The multimodal class runs text only (transformers never calls the vision tower without pixel_values): its
            // tower and projector are built inert, the text model under language_model.
            Runtime = TextRuntime(text, vocab, hidden, inter, interMlp, layers, heads, kv, headDim, experts, topK,
                useQkNorm, attnBias, tie, act, moeSet, noRope) with
            {
                Towers = multimodal ? InertTowers.Before(["vision_model", "multi_modal_projector"], "language_model.model", "language_model.lm_head") : null,
            },
        };
    }

    private static DecoderRuntime TextRuntime(ModelConfig text, long vocab, long hidden, long inter, long interMlp, long layers,
        long heads, long kv, long headDim, long experts, long topK, bool useQkNorm, bool attnBias, bool tie, string act,
        HashSet<int> moeSet, IReadOnlyList<bool> noRope)
    {
        var norm = new NormSettings(NormKind.Rms, text.Double("rms_norm_eps", 1e-5));
        // layer_types defaults to chunked attention on rope layers, full attention on the others (Llama4TextConfig).
        var types = text.StringList("layer_types")
            ?? noRope.Select(r => r ? "chunked_attention" : "full_attention").ToList();
        if (types.Count < layers) throw new ConfigException($"config field 'layer_types' has {types.Count} entries for {layers} layers");
        var chunk = text.IntOrNull("attention_chunk_size", 8192) ?? 8192;
        var sparse = new MoeSettings(new Llama4RouterSettings("router", experts, topK),
            new ExpertsSettings(ExpertsLayout.Llama4InOut, experts, inter, act),
            new SharedExpertSettings("shared_expert", inter, act, SigmoidGateName: null, ActName: "activation_fn"), MoeOrder.ExpertsFirst);
        var dense = new GatedMlpSettings(interMlp, act, ActName: "activation_fn");
        var runtimeLayers = Enumerable.Range(0, (int)layers).Select(i =>
        {
            var useRope = i < noRope.Count && noRope[i];
            var attention = new Llama4AttentionSettings(heads, kv, headDim, attnBias, useRope, QkL2Norm: useQkNorm && useRope, norm.Eps,
                TemperatureTuning: text.Bool("attn_temperature_tuning", true) && !useRope, text.Double("attn_scale", 0.1),
                text.Double("floor_scale", 8192), types[i] == "chunked_attention" ? new MaskSettings(MaskKind.Chunked, chunk) : MaskSettings.Full);
            return new DecoderLayerRuntime(attention, "feed_forward", moeSet.Contains(i) ? sparse : dense, norm, norm);
        }).ToList();
        return new DecoderRuntime(vocab, hidden, tie, text.Double("initializer_range", 0.02), norm,
            RopeSettings.Read(text, 500000.0, headDim), runtimeLayers);
    }

    /// <summary>The vision tower and the multimodal projector, registered before the language model.</summary>
    private static void Vision(TreeBuilder b, ModelConfig v, long textHidden)
    {
        var hv = v.Positive("hidden_size", 768);
        var iv = v.Positive("intermediate_size", 5632);
        var layers = v.Positive("num_hidden_layers", 34);
        var channels = v.Positive("num_channels", 3);
        var patch = v.Positive("patch_size", 14);
        var image = v.Positive("image_size", 448);
        var projIn = v.Positive("projector_input_dim", 4096);
        var projOut = v.Positive("projector_output_dim", 4096);
        var visionOut = v.Positive("vision_output_dim", 7680);
        var projectorBias = v.Bool("multi_modal_projector_bias", false);
        var positions = (image / patch) * (image / patch) + 1;

        using (b.Scope("vision_model", "Llama4VisionModel", ModuleLocation.Vision))
        {
            b.Param("class_embedding", hv);
            b.Param("positional_embedding_vlm", positions, hv);
            using (b.Scope("patch_embedding", "Llama4UnfoldConvolution"))
            {
                b.Leaf("unfold", "Unfold");
                b.Linear("linear", channels * patch * patch, hv);
            }
            b.Leaf("rotary_embedding", "Llama4VisionRotaryEmbedding");
            b.LayerNorm("layernorm_pre", hv);
            b.LayerNorm("layernorm_post", hv);
            using (b.Scope("model", "Llama4VisionEncoder"))
            {
                b.ModuleList("layers", layers, j =>
                {
                    using (b.Scope(j.ToString(System.Globalization.CultureInfo.InvariantCulture), "Llama4VisionEncoderLayer"))
                    {
                        using (b.Scope("self_attn", "Llama4VisionAttention"))
                        {
                            b.Linear("q_proj", hv, hv, true);
                            b.Linear("k_proj", hv, hv, true);
                            b.Linear("v_proj", hv, hv, true);
                            b.Linear("o_proj", hv, hv, true);
                        }
                        using (b.Scope("mlp", "Llama4VisionMLP"))
                        {
                            b.Leaf("activation_fn", "GELU");
                            b.Linear("fc1", hv, iv, true);
                            b.Linear("fc2", iv, hv, true);
                        }
                        b.LayerNorm("input_layernorm", hv);
                        b.LayerNorm("post_attention_layernorm", hv);
                    }
                });
            }
            using (b.Scope("vision_adapter", "Llama4VisionPixelShuffleMLP"))
            using (b.Scope("mlp", "Llama4VisionMLP2"))
            {
                b.Linear("fc1", iv, projIn);
                b.Linear("fc2", projOut, projOut);
                b.Leaf("activation_fn", "GELU");
            }
        }
        using (b.Scope("multi_modal_projector", "Llama4MultiModalProjector", ModuleLocation.Projector))
        {
            b.Linear("linear_1", visionOut, textHidden, projectorBias);
        }
    }
}
