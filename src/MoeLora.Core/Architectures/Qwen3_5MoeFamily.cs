using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Qwen3.5-MoE (<c>qwen3_5_moe</c>, <c>qwen3_5_moe_text</c>): the Qwen3-Next hybrid (Gated DeltaNet linear attention,
/// every <c>full_attention_interval</c>-th layer gated full attention, per <c>layer_types</c>) with an MoE block in
/// every layer: softmax top-k router, fused experts, a sigmoid-gated shared expert. The Gated DeltaNet splits
/// Qwen3-Next's in_proj_qkvz / in_proj_ba into in_proj_qkv, in_proj_z, in_proj_b, in_proj_a.
/// <para>
/// A <c>qwen3_5_moe</c> config builds the class its <c>architectures</c> names; without one,
/// <c>AutoModelForCausalLM</c> builds the text-only <c>Qwen3_5MoeForCausalLM</c> over <c>text_config</c> (its
/// config.model_type, which PEFT reads, is then <c>qwen3_5_moe_text</c>). <c>Qwen3_5MoeForConditionalGeneration</c>
/// nests <c>model.visual</c> (the Qwen3-VL vision tower without deepstack mergers) and <c>model.language_model</c>;
/// the runtime runs it on text, the vision tower built but never run.
/// </para>
/// <para>
/// PEFT 0.21 has no MoE rewrite for these types, so <c>gate_proj</c>/<c>up_proj</c>/<c>down_proj</c> reach only the
/// shared expert; the routed experts need <c>target_parameters</c>.
/// </para>
/// <para>
/// Not in transformers 4.57: <see cref="Layout.V4"/> means the on-disk checkpoint layout, which transformers 5.17
/// writes per expert (<c>mlp.experts.{e}.gate_proj/up_proj/down_proj</c>, its qwen2_moe conversion) under the v5
/// module names. The oracle checks this for <c>Qwen3_5MoeForCausalLM</c>; for the multimodal class the same rule is
/// applied under <c>model.language_model</c>.
/// </para>
/// </summary>
internal sealed class Qwen3_5MoeFamily : IArchitecture
{
    private const string P = "Qwen3_5Moe";

    public IReadOnlyList<string> ModelTypes => ["qwen3_5_moe", "qwen3_5_moe_text"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var composite = c.ModelType == "qwen3_5_moe";
        var multimodal = composite && Blocks.HeadClass(c, P + "ForCausalLM", P + "ForConditionalGeneration") == P + "ForConditionalGeneration";
        var text = composite ? Blocks.SubOrDefaults(c, "text_config") : c;

        // Defaults: Qwen3_5MoeTextConfig.
        var vocab = text.Positive("vocab_size", 248320);
        var hidden = text.Positive("hidden_size", 2048);
        var layers = text.Positive("num_hidden_layers", 40);
        var heads = text.Positive("num_attention_heads", 16);
        var kv = text.IntOrNull("num_key_value_heads", 2) ?? heads;
        var headDim = Blocks.HeadDim(text, hidden, heads, classDefault: 256);
        var lin = Blocks.QwenLinearAttentionDims.Read(text);
        var experts = text.Positive("num_experts", 256);
        var topK = text.Positive("num_experts_per_tok", 8);
        var moeInter = text.Positive("moe_intermediate_size", 512);
        var sharedInter = text.Positive("shared_expert_intermediate_size", 512);
        var bias = text.Bool("attention_bias", false);
        var act = text.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var layerTypes = Blocks.QwenHybridLayerTypes(text, layers, ["full_attention"]);
        // The multimodal class ties by its own config; the causal LM by the (text) config it runs on.
        var tie = multimodal ? c.Bool("tie_word_embeddings", false) : text.Bool("tie_word_embeddings", false);

        var b = new TreeBuilder(multimodal ? P + "ForConditionalGeneration" : P + "ForCausalLM", layout);
        void Layer(int i)
        {
            if (layerTypes[i] == "linear_attention") Blocks.QwenGatedDeltaNet(b, P, hidden, lin);
            else Blocks.QwenGatedAttention(b, P, hidden, heads, kv, headDim, bias);
            Blocks.QwenSharedExpertMoe(b, layout, P, experts, hidden, moeInter, sharedInter, actClass);
            b.RmsNorm("input_layernorm", P + "RMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", P + "RMSNorm", hidden, ModuleLocation.Norm);
        }

        var textModel = "model";
        if (multimodal)
        {
            textModel = "model.language_model";
            using (b.Scope("model", P + "Model"))
            {
                Blocks.QwenVisionTower(b, "visual", P, Blocks.SubOrDefaults(c, "vision_config"), layout, deepstack: false);
                Blocks.TextModel(b, "language_model", P + "TextModel", P + "DecoderLayer", vocab, hidden, layers, Layer,
                    P + "RMSNorm", P + "TextRotaryEmbedding");
            }
        }
        else
        {
            Blocks.TextModel(b, "model", P + "TextModel", P + "DecoderLayer", vocab, hidden, layers, Layer,
                P + "RMSNorm", P + "TextRotaryEmbedding");
        }
        Blocks.LmHead(b, hidden, vocab, tie, textModel + ".embed_tokens");

        var routing = $"softmax over {experts} experts, top-{topK}, renormalised, plus a sigmoid-gated shared expert";
        var moe = new MoeFacts(experts, topK, 1, moeInter, sharedInter, Enumerable.Range(0, (int)layers).ToList(), [], routing);
        var modelType = composite && !multimodal ? text.ModelType ?? "qwen3_5_moe_text" : c.ModelType!;
        var spec = Blocks.NestedSpec(c, text, modelType, b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act, textModel);
        var runtime = TextRuntime(text, lin, vocab, hidden, layers, heads, kv, headDim, bias, experts, topK, moeInter, sharedInter, act, tie, layerTypes);
        // The multimodal class runs text only (no pixel_values: transformers never calls model.visual): the tower is built
        // inert. Its text-only positions are cumsum(attention_mask) - 1 rather than 0..S-1, which shifts a left-padded row's
        // real tokens by one constant: rope depends on position differences only and the delta rule on none, so their
        // outputs are the text decoder's (up to rounding); only padded positions, which no loss reads, differ.
        return spec with
        {
            Runtime = multimodal ? runtime with { Towers = InertTowers.Before(["model.visual"], "model.language_model", "lm_head") } : runtime,
        };
    }

    /// <summary>
    /// The text decoder as transformers runs it. Its rope is multimodal (mrope sections over temporal, height and
    /// width positions), but a text-only forward gives all three the same positions, which is the plain rotation over
    /// partial_rotary_factor (0.25) of head_dim.
    /// </summary>
    private static DecoderRuntime TextRuntime(ModelConfig text, Blocks.QwenLinearAttentionDims lin, long vocab, long hidden, long layers, long heads,
        long kv, long headDim, bool bias, long experts, long topK, long moeInter, long sharedInter, string act, bool tie,
        IReadOnlyList<string> layerTypes)
    {
        // Every RMSNorm but the gated one is zero-centred: (1 + weight), the weight starting at zero.
        var eps = text.Double("rms_norm_eps", 1e-6);
        var norm = new NormSettings(NormKind.RmsOnePlusWeight, eps);
        var rotaryDim = (long)(headDim * RopeSettings.PartialRotaryFactor(text, 0.25));
        var attention = new StandardAttentionSettings(heads, kv, headDim, bias, bias, QkNormKind.PerHead, eps, Sinks: false,
            MaskSettings.Full, rotaryDim, new StandardAttentionOptions(QkNormType: NormKind.RmsOnePlusWeight, GateInQuery: true));
        var deltaNet = new GatedDeltaNetSettings(lin.KHeads, lin.VHeads, lin.KHeadDim, lin.VHeadDim, lin.ConvKernel,
            DeltaNetProjections.Split, eps, ConvAct: act);
        // The router always renormalises its top-k (no norm_topk_prob field).
        var sparse = new MoeSettings(new SoftmaxTopKRouterSettings("gate", experts, topK, NormTopK: true),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
            new SharedExpertSettings("shared_expert", sharedInter, act, SigmoidGateName: "shared_expert_gate"), MoeOrder.RouterFirst);
        var runtimeLayers = Enumerable.Range(0, (int)layers).Select(i => layerTypes[i] == "linear_attention"
            ? new DecoderLayerRuntime(deltaNet, "mlp", sparse, norm, norm, GatedDeltaNetSettings.PreNormLayer(norm, norm))
            : new DecoderLayerRuntime(attention, "mlp", sparse, norm, norm)).ToList();
        return new DecoderRuntime(vocab, hidden, tie, text.Double("initializer_range", 0.02), norm,
            RopeSettings.Read(text, 10000.0, rotaryDim), runtimeLayers);
    }
}
