namespace MoeLora.Core.Architectures.Runtime;

/// <summary>
/// What the transformers-5 decoder of one config computes, as typed settings: the TorchSharp runtime builds its
/// model from this record alone (its <c>named_parameters()</c> equal the family's <c>Layout.V5</c> tree, tested), so
/// every config field and default is read once, in the family file that also builds the tree.
/// </summary>
/// <param name="VocabSize">Rows of <c>model.embed_tokens</c> and of <c>lm_head</c>.</param>
/// <param name="HiddenSize">The residual stream width.</param>
/// <param name="TieWordEmbeddings">lm_head.weight is the embedding's Parameter.</param>
/// <param name="InitializerRange">Std of transformers' normal init (seeded random models).</param>
/// <param name="FinalNorm"><c>model.norm</c>.</param>
/// <param name="Rope">The model's one rotary table (<c>model.rotary_emb</c>).</param>
/// <param name="Layers">One entry per decoder layer, in order.</param>
/// <param name="LmHeadBias">lm_head has a bias (ERNIE's <c>use_bias</c>, PhiMoE's <c>lm_head_bias</c>).</param>
/// <param name="Scaling">Embedding / logits multipliers, where the family has them.</param>
/// <param name="Names">Embedding, final norm and rotary module names when they are not Llama's (null: Llama's).</param>
/// <param name="EmbeddingAffine">Per-channel Parameters of the model itself (named_parameters lists them before its
/// children) that shift and scale the embeddings, <c>(e + bias) · scale</c> (ZAYA's input_hidden_states_scale /
/// input_hidden_states_bias, in that order); null: none.</param>
/// <param name="ResidualInFp32">The residual stream is fp32 whatever the model's dtype (ZayaModel casts the embeddings
/// to fp32; each norm reads the residual cast to the model's dtype, the residual additions promote back to fp32, the
/// final norm reads it cast back): the recorded hidden states are fp32.</param>
/// <param name="EmbeddingNorm">A norm of the model applied to the embeddings before the first layer, registered after the
/// final norm (Inkling's <c>embed_norm</c>); hidden_states[0] is its output. Null: none.</param>
/// <param name="EmbeddingNormPasses">How many times <paramref name="EmbeddingNorm"/> is applied in a row (transformers
/// 5.17's InklingModel norms the embeddings it passes to its text model, which norms them again: 2).</param>
/// <param name="HyperConnections">The residual stream is several parallel streams mixed around each sublayer (HY-V4);
/// null: one stream.</param>
/// <param name="Towers">A multimodal model's vision/audio towers, registered around the text model but never run (a
/// text-only forward of transformers' multimodal class is its text decoder's forward); null: a text-only model.</param>
/// <param name="PlaceholderIds">Input ids embedded as id 0 (Kimi K2.5's image and video placeholders: Kimi_K25Model
/// zeroes them before the embedding whether or not pixel values come); null: every id embeds as itself.</param>
public sealed record DecoderRuntime(
    long VocabSize,
    long HiddenSize,
    bool TieWordEmbeddings,
    double InitializerRange,
    NormSettings FinalNorm,
    RopeSettings Rope,
    IReadOnlyList<DecoderLayerRuntime> Layers,
    bool LmHeadBias = false,
    ModelScaling? Scaling = null,
    ModelNames? Names = null,
    (string Scale, string Bias)? EmbeddingAffine = null,
    bool ResidualInFp32 = false,
    NamedNorm? EmbeddingNorm = null,
    HyperConnectionSettings? HyperConnections = null,
    InertTowers? Towers = null,
    int EmbeddingNormPasses = 1,
    IReadOnlyList<long>? PlaceholderIds = null);

/// <summary>
/// A multimodal model run on text only, as transformers runs it when given only input_ids: the towers' subtrees
/// (modules of Core's tree, e.g. <c>vision_model</c> and <c>multi_modal_projector</c>) are built with exactly Core's
/// parameters (so PEFT targets in them are injected, counted, saved and loaded), but have no forward; the text model
/// and the LM head sit at their own dotted paths. A path's missing parents are parameter-less containers.
/// </summary>
/// <param name="Order">Every placed module as a dotted path, in registration order: the towers, with
/// <paramref name="TextModel"/> and <paramref name="LmHead"/> among them. An entry may instead name a bare parameter of
/// Core's tree (DeepSeek-OCR-2's <c>model.view_separator</c>, a Parameter of <c>model</c> itself that only image features
/// use): it is registered on its parent, frozen and never read.</param>
/// <param name="TextModel">The text model's path (Llama 4: <c>language_model.model</c>; Aria: <c>model.language_model</c>).</param>
/// <param name="LmHead">The LM head's path (Llama 4: <c>language_model.lm_head</c>; Aria: <c>lm_head</c>).</param>
public sealed record InertTowers(IReadOnlyList<string> Order, string TextModel, string LmHead)
{
    /// <summary>The tower paths, bare tower parameters included (every entry of <see cref="Order"/> but the text model
    /// and the LM head).</summary>
    public IEnumerable<string> Towers => Order.Where(p => p != TextModel && p != LmHead);

    /// <summary>Towers, then the text model, then the LM head: the usual order.</summary>
    public static InertTowers Before(IReadOnlyList<string> towers, string textModel, string lmHead) =>
        new([.. towers, textModel, lmHead], textModel, lmHead);
}

/// <summary>
/// One pre-norm decoder layer: <c>h = x + attn(input_layernorm(x))</c>, <c>out = h + ff(post_attention_layernorm(h))</c>,
/// registered as self_attn, <paramref name="FeedForwardName"/>, input_layernorm, post_attention_layernorm.
/// </summary>
/// <param name="FeedForwardName">The attribute of the feed-forward block: <c>mlp</c>, or <c>feed_forward</c> (Llama 4).</param>
/// <param name="Form">Another norm arrangement (post-norm, sandwich, parallel, residual multiplier); when set its norms
/// replace <paramref name="InputNorm"/> and <paramref name="PostAttentionNorm"/>.</param>
/// <param name="Shortcut">LongCat-Flash's two-sublayer layer around a shortcut MoE (the feed-forward); excludes <paramref name="Form"/>.</param>
/// <param name="Convs">Inkling's residual short convolutions on each sublayer's output, before its residual (pre-norm
/// layer only).</param>
public sealed record DecoderLayerRuntime(
    AttentionSettings Attention,
    string FeedForwardName,
    FeedForwardSettings FeedForward,
    NormSettings InputNorm,
    NormSettings PostAttentionNorm,
    LayerForm? Form = null,
    ShortcutMoeForm? Shortcut = null,
    SublayerConvs? Convs = null);

/// <summary>Which norm a layer uses (RMSNorm or LayerNorm) and how it applies its weight.</summary>
public enum NormKind
{
    /// <summary>Statistics in fp32, cast back to the input dtype, then times the weight (Llama and most families).</summary>
    Rms,

    /// <summary>Statistics in fp32, times the weight still in fp32, then cast back (gpt-oss).</summary>
    RmsWeightInFp32,

    /// <summary>torch's nn.LayerNorm with weight and bias (PhiMoE).</summary>
    LayerNorm,

    /// <summary>Mean-centred LayerNorm in fp32 with a weight and no bias, cast back last (Cohere's LayerNorm).</summary>
    LayerNormNoBias,

    /// <summary>RMS statistics in fp32, times (1 + weight) in fp32, cast back last; the weight starts at zero (MiniMax-M3).</summary>
    RmsOnePlusWeight,

    /// <summary>
    /// A.X-K2's AXK2GatedRMSNorm: <c>y = norm(x)</c> (an <see cref="Rms"/> norm), then <c>y · sigmoid(fc2(SiLU(fc1(y))))</c>
    /// with the sigmoid in fp32, cast back; registered <c>norm</c>, then <c>mlp</c> (activation_fn, fc1 [rank, H],
    /// fc2 [H, rank], no biases), rank <see cref="NormSettings.GateRank"/>.
    /// </summary>
    GatedRms,
}

/// <summary>A norm: its kind and epsilon (and the gate's rank for <see cref="NormKind.GatedRms"/>).</summary>
public sealed record NormSettings(NormKind Kind, double Eps, long GateRank = 0);
