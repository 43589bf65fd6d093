namespace MoeLora.Core.Architectures.Runtime;

/// <summary>A norm of a decoder layer under its attribute name.</summary>
public sealed record NamedNorm(string Name, NormSettings Norm);

/// <summary>
/// Where a decoder layer's norms sit and how its residuals add, for layers that are not the default pre-norm
/// (<see cref="DecoderLayerRuntime.InputNorm"/> / <see cref="DecoderLayerRuntime.PostAttentionNorm"/>, registered
/// self_attn, ff, input_layernorm, post_attention_layernorm). Each norm is optional:
/// <c>h = x + m·AfterAttention(attn(BeforeAttention(x)))</c>, <c>out = h + m·AfterFeedForward(ff(BeforeFeedForward(h)))</c>
/// with m = <paramref name="ResidualMultiplier"/>; pre-norm uses the Before norms (Granite), post-norm the After norms
/// (OLMo 2 / FlexOlmo), sandwich all four (AFMoE). <paramref name="Parallel"/>: attention and feed-forward both read
/// <c>BeforeAttention(x)</c> and <c>out = x + attn + ff</c> (Cohere).
/// </summary>
/// <param name="Order">The layer's children in registration order (named_parameters order): "self_attn", the
/// feed-forward name, the norm names and <see cref="ExtraFeedForwardName"/> where present. A dotted name
/// (<c>norm_attn_norm.attn</c>) nests that child one level down in a module without parameters (DBRX).</param>
/// <param name="ResidualScales">Learned per-channel residual scales, the layer's own Parameters [hidden] (so they
/// enumerate before its children): <c>h = s₁ ⊙ x + attn</c>, <c>out = s₂ ⊙ h + ff</c> (Doge's input_residual,
/// post_attention_residual); null: plain residuals.</param>
/// <param name="AttentionName">The attribute of the attention sublayer or other sequence mixer (Qwen3-Next's and
/// Qwen3.5's Gated DeltaNet: <c>linear_attn</c>; LFM2's <c>conv</c>; Nemotron-H's <c>mixer</c>; GraniteMoeHybrid's
/// <c>mamba</c>). A layer whose attention is <see cref="NoAttentionSettings"/> or whose feed-forward is
/// <see cref="NoFeedForwardSettings"/> registers and runs only the other sublayer.</param>
/// <param name="AffineResiduals">ZAYA's <c>ZayaResidualScaling</c> modules (attribute names after attention and
/// after the feed-forward, in <paramref name="Order"/>), each holding hidden_states_scale, hidden_states_bias,
/// residual_scale, residual_bias: <c>h = (attn + hb) · hs + (x + rb) · rs</c>, likewise for the feed-forward; null: plain residuals.</param>
/// <param name="NormedResiduals">MiniMax's residual weighting (MiniMaxDecoderLayer): the residual is the norm's
/// output, <c>n = BeforeAttention(x)</c>, <c>h = n · α₁ + attn(n) · β₁</c>, <c>m = BeforeFeedForward(h)</c>,
/// <c>out = m · α₂ + ff(m) · β₂</c> (the config's <c>*_alpha_factor</c> / <c>*_beta_factor</c>); null: the residual is
/// the layer's input.</param>
/// <param name="ExtraFeedForward">A second feed-forward added to the first on the same input (GraniteMoeShared's
/// <c>shared_mlp</c>), registered as <paramref name="ExtraFeedForwardName"/>.</param>
public sealed record LayerForm(
    IReadOnlyList<string> Order,
    NamedNorm? BeforeAttention,
    NamedNorm? AfterAttention,
    NamedNorm? BeforeFeedForward,
    NamedNorm? AfterFeedForward,
    bool Parallel = false,
    double ResidualMultiplier = 1.0,
    FeedForwardSettings? ExtraFeedForward = null,
    string? ExtraFeedForwardName = null,
    (string Attention, string FeedForward)? ResidualScales = null,
    string AttentionName = "self_attn",
    (string Attention, string FeedForward)? AffineResiduals = null,
    NormedResiduals? NormedResiduals = null);

/// <summary>The weights of <see cref="LayerForm.NormedResiduals"/>: residual (α) and sublayer (β) after attention and after the feed-forward.</summary>
public sealed record NormedResiduals(double AttentionAlpha, double AttentionBeta, double FeedForwardAlpha, double FeedForwardBeta);

/// <summary>
/// LongCat-Flash's layer (<c>LongcatFlashDecoderLayer</c>): two pre-norm sublayer pairs, each an attention and a dense
/// MLP with weights of their own (<c>self_attn.{0,1}</c>, <c>mlps.{0,1}</c>, <c>input_layernorm.{0,1}</c>,
/// <c>post_attention_layernorm.{0,1}</c>, all of <see cref="DecoderLayerRuntime.Attention"/>'s and the layer's norms'
/// settings), and the layer's feed-forward (the shortcut MoE) reading the first pair's post-attention norm output and
/// added to the residual after the second MLP:
/// <c>h₁ = x + attn₀(n₀(x))</c>, <c>m = moe(p₀(h₁))</c>, <c>h₂ = h₁ + mlp₀(p₀(h₁))</c>, <c>h₃ = h₂ + attn₁(n₁(h₂))</c>,
/// <c>out = h₃ + mlp₁(p₁(h₃)) + m</c>. Registered: the MoE, self_attn, mlps, input_layernorm, post_attention_layernorm.
/// </summary>
/// <param name="DenseMlp">Both <c>mlps</c>.</param>
/// <param name="DenseName">The attribute of the dense MLP list (<c>mlps</c>).</param>
public sealed record ShortcutMoeForm(FeedForwardSettings DenseMlp, string DenseName = "mlps");

/// <summary>
/// Model-level scalars around the decoder stack: embeddings times <paramref name="EmbeddingMultiplier"/> before the
/// first layer (Granite's embedding_multiplier, AFMoE's muP √hidden; hidden_states[0] is the scaled embedding, as
/// transformers records the first layer's input), logits times <paramref name="LogitsMultiplier"/> (Cohere's
/// logit_scale, Granite's 1/logits_scaling).
/// </summary>
public sealed record ModelScaling(double EmbeddingMultiplier = 1.0, double LogitsMultiplier = 1.0);
