using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Qwen3-VL-MoE (<c>qwen3_vl_moe</c>): <c>Qwen3VLMoeForConditionalGeneration</c> (transformers 5.17 has no causal-LM
/// class for it): <c>model.visual</c> (the Qwen3-VL vision tower with its deepstack mergers), then
/// <c>model.language_model</c>, a Qwen3-MoE decoder (q/k norms; a layer is MoE unless in <c>mlp_only_layers</c> or off
/// <c>decoder_sparse_step</c>; experts registered before the softmax top-k router, no shared expert), and a root
/// <c>lm_head</c> tied by the top-level <c>tie_word_embeddings</c>.
/// <para>
/// <see cref="Layout.V4"/> is what transformers 5.17's save_pretrained writes: the v5 names and shapes. Its checkpoint
/// conversion only transposes fused experts whose shape differs from the runtime's (<c>Transpose(check_dims=True)</c>),
/// so the (E, H, 2I) / (E, I, H) tensors of Hub checkpoints made with 4.57 load too, but are saved (E, 2I, H) / (E, H, I).
/// </para>
/// </summary>
internal sealed class Qwen3VLMoeFamily : IArchitecture
{
    private const string P = "Qwen3VLMoe";

    public IReadOnlyList<string> ModelTypes => ["qwen3_vl_moe"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var text = Blocks.SubOrDefaults(c, "text_config");
        // Defaults: Qwen3VLMoeTextConfig (num_experts is stored as num_local_experts).
        var vocab = text.Positive("vocab_size", 151936);
        var hidden = text.Positive("hidden_size", 2048);
        var inter = text.Positive("intermediate_size", 5632);
        var layers = text.Positive("num_hidden_layers", 24);
        var heads = text.Positive("num_attention_heads", 16);
        var kv = text.IntOrNull("num_key_value_heads", 16) ?? heads;
        var headDim = Blocks.HeadDim(text, hidden, heads);
        var experts = text.FirstInt("num_local_experts", "num_experts") ?? 60;
        var topK = text.Positive("num_experts_per_tok", 4);
        var moeInter = text.Positive("moe_intermediate_size", 1408);
        var bias = text.Bool("attention_bias", false);
        var act = text.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var tie = c.Bool("tie_word_embeddings", false);

        var (moeLayers, denseLayers) = QwenMoeFamily.MoeLayers(text, layers, experts);
        var moeSet = moeLayers.ToHashSet();
        var dims = new QwenMoeFamily.LayerDims(hidden, heads, kv, headDim, bias, bias, inter, experts, moeInter, 0, actClass);

        var b = new TreeBuilder(P + "ForConditionalGeneration", layout);
        using (b.Scope("model", P + "Model"))
        {
            Blocks.QwenVisionTower(b, "visual", P, Blocks.SubOrDefaults(c, "vision_config"), layout, deepstack: true);
            // Both layouts hold fused experts (see above).
            Blocks.TextModel(b, "language_model", P + "TextModel", P + "TextDecoderLayer", vocab, hidden, layers,
                i => QwenMoeFamily.Layer(b, P + "Text", qwen3: true, Layout.V5, dims, moeSet.Contains(i), "ModuleList"),
                P + "TextRMSNorm", P + "TextRotaryEmbedding");
        }
        Blocks.LmHead(b, hidden, vocab, tie, "model.language_model.embed_tokens");

        var moe = new MoeFacts(experts, topK, 0, moeInter, 0, moeLayers, denseLayers,
            $"softmax over {experts} experts, top-{topK}, renormalised");
        // Runtime: text only, as transformers runs the class given only input_ids. Without pixel values model.visual is
        // never called and no deepstack features are added to the first layers' hidden states, and without image/video
        // grids compute_3d_position_ids returns None, so the text model uses positions 0..S-1 for all three mrope sections
        // (T, H, W): the interleaved recomposition then picks every frequency from identical tables, which is the plain
        // rope over head_dim. The decoder is Qwen3-MoE's; its router always renormalises its top-k (no norm_topk_prob).
        var runtime = QwenMoeFamily.Runtime(text, qwen3: true, vocab, hidden, inter, layers, heads, kv, headDim, bias, bias,
            experts, topK, normTopK: true, moeInter, sharedInter: 0, act, tie, moeSet, defaultTheta: 500000.0);
        return Blocks.NestedSpec(c, text, "qwen3_vl_moe", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act,
            "model.language_model") with
        {
            Runtime = runtime with { Towers = InertTowers.Before(["model.visual"], "model.language_model", "lm_head") },
        };
    }
}
