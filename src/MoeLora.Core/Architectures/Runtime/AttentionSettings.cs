namespace MoeLora.Core.Architectures.Runtime;

/// <summary>Which keys a query may see beyond causality and padding.</summary>
public enum MaskKind
{
    Full,
    /// <summary>Only the last <see cref="MaskSettings.Window"/> positions (Mistral, gpt-oss sliding layers).</summary>
    Sliding,
    /// <summary>Only positions of the same chunk of <see cref="MaskSettings.Window"/> tokens (Llama 4).</summary>
    Chunked,
}

public sealed record MaskSettings(MaskKind Kind, long Window = 0)
{
    public static MaskSettings Full { get; } = new(MaskKind.Full);
}

/// <summary>Where q/k RMSNorms sit in a standard attention.</summary>
public enum QkNormKind
{
    None,
    /// <summary>q_norm / k_norm over head_dim, per head, before rope (Qwen3, GLM-4.5 with use_qk_norm).</summary>
    PerHead,
    /// <summary>q_norm over heads·head_dim and k_norm over kv_heads·head_dim, before the head split (OLMoE).</summary>
    Full,
}

/// <summary>The self-attention of a decoder layer; each kind maps to one runtime block.</summary>
public abstract record AttentionSettings;

/// <summary>
/// GQA self-attention with q, k, v, o projections (registered in that order), rope by rotating halves on the first
/// <paramref name="RotaryDim"/> dims of each head (partial rotary passes the rest through), eager softmax in fp32
/// with scaling head_dim^-0.5.
/// </summary>
/// <param name="Sinks">gpt-oss: a per-head <c>sinks</c> parameter, registered before the projections, joins the softmax.</param>
/// <param name="QkNormEps">Epsilon of q_norm / k_norm.</param>
/// <param name="Options">Per-layer rope, rotation style, q/k norm order, names and kind, value head size and scale, softmax scale and dtype, output gate (null: as Llama).</param>
public sealed record StandardAttentionSettings(
    long Heads,
    long KvHeads,
    long HeadDim,
    bool QkvBias,
    bool OBias,
    QkNormKind QkNorm,
    double QkNormEps,
    bool Sinks,
    MaskSettings Mask,
    long RotaryDim,
    StandardAttentionOptions? Options = null) : AttentionSettings;

/// <summary>
/// Doge's dynamic-mask attention: q, k, v projections, a per-kv-head Parameter <c>A</c> (registered first, so it
/// enumerates before the projections), <c>dt_proj</c> (kv·head_dim → kv heads), o_proj, then per-head q_norm / k_norm
/// (before rope). The additive mask is <c>exp(A · softplus(dt_proj(v)))</c> per key and kv head, the minimum where the
/// causal (or sliding) mask forbids; beyond <paramref name="KeepWindowSize"/> keys only the top ones of each row stay.
/// </summary>
public sealed record DynamicMaskAttentionSettings(long Heads, long KvHeads, long HeadDim, bool Bias, double QkNormEps, MaskSettings Mask,
    long KeepWindowSize) : AttentionSettings;

/// <summary>
/// DeepSeek's multi-head latent attention: q through q_a_proj, q_a_layernorm, q_b_proj (or one q_proj when
/// <paramref name="QLoraRank"/> is null), compressed kv through kv_a_proj_with_mqa, kv_a_layernorm and kv_b_proj,
/// rope on the last <paramref name="QkRopeHeadDim"/> dims only (shared by all heads for k).
/// </summary>
/// <param name="RopeInterleave">De-interleave the rope dims before rotating halves (<c>rope_interleave</c>).</param>
/// <param name="Scaling">Softmax scale: (nope+rope)^-0.5, times yarn's mscale² when the rope says so.</param>
/// <param name="LowRankNormEps">Epsilon of q_a_layernorm / kv_a_layernorm.</param>
/// <param name="RopeComplexPairs">DeepSeek-V2's <c>apply_rotary_emb</c>: the rope dims are complex numbers
/// (x[2i] + i·x[2i+1], <c>view_as_complex</c>) multiplied by the scaled <c>freqs_cis</c> in fp32, the result left
/// interleaved; overrides <paramref name="RopeInterleave"/>.</param>
/// <param name="QueryScale">Mistral 4's position-dependent query scale (null: none).</param>
/// <param name="QueryGate">A.X-K2's <c>q_gate_proj</c> replaces q_b_proj: it maps cat(q_a_layernorm(q_a), q_a)
/// [2·q_lora_rank] to per head qk_head_dim query dims then v_head_dim gate dims, and the attention output is
/// multiplied by sigmoid(gate) in fp32 before o_proj (AXK2Attention.forward).</param>
/// <param name="Indexer">The DSA lightning indexer of this layer (registered last, as <c>indexer</c>); null: none.</param>
/// <param name="ReusesTopK">GLM-5's "shared" indexer layers: no indexer of their own, the previous layer's top-k
/// selection restricts the keys (GlmMoeDsaAttention with <c>skip_topk</c>).</param>
/// <param name="LatentScale">LongCat-Flash's constant scales of the query and of the normed kv latent (null: none).</param>
/// <param name="Sinks">HY-V4: a per-head <c>sinks</c> Parameter (a direct parameter, so it enumerates before the
/// projections) joins the softmax as gpt-oss' does (eager attention with sinks).</param>
/// <param name="NoRope">Kimi Linear's MLA ("with NoPE"): the last <paramref name="QkRopeHeadDim"/> dims are not rotated
/// (the key's part stays shared by all heads) and the model has no rotary module.</param>
/// <param name="Gate">HY-V4's output gate: a bias-free Linear (hidden → heads·v_head_dim, registered after the indexer)
/// whose sigmoid multiplies the attention output per element before o_proj; null: none.</param>
public sealed record MlaAttentionSettings(
    long Heads,
    long? QLoraRank,
    long KvLoraRank,
    long QkNopeHeadDim,
    long QkRopeHeadDim,
    long VHeadDim,
    bool Bias,
    bool RopeInterleave,
    double Scaling,
    double LowRankNormEps,
    bool RopeComplexPairs = false,
    Llama4QueryScale? QueryScale = null,
    bool QueryGate = false,
    DsaIndexerSettings? Indexer = null,
    bool ReusesTopK = false,
    MlaLatentScale? LatentScale = null,
    bool Sinks = false,
    OutputGate? Gate = null,
    bool NoRope = false) : AttentionSettings;

/// <summary>
/// The DeepSeek sparse attention (DSA) lightning indexer (transformers' DeepseekV32Indexer, AXK2Indexer,
/// GlmMoeDsaIndexer): wq_b (q LoRA latent → heads·head_dim), wk (hidden → head_dim), k_norm (LayerNorm, eps 1e-6,
/// with bias), weights_proj (hidden → heads). Rope on the first qk_rope_head_dim dims of each indexer head; the
/// scores relu(q·k·head_dim^-0.5) summed over heads with weights_proj(x)·heads^-0.5, plus the causal/padding mask;
/// each query keeps its top <paramref name="TopK"/> keys (at most all) and the attention mask is the dtype's minimum
/// at the others. No gradient flows through it (<c>@torch.no_grad()</c>).
/// </summary>
/// <param name="InterleavedRope">GLM-5 rotates interleaved pairs (<c>apply_rotary_pos_emb_interleave</c>);
/// DeepSeek-V3.2 and A.X-K2 rotate halves (<c>apply_rotary_pos_emb</c>).</param>
/// <param name="RopeOnLast">HY-V4's indexer rotates the last qk_rope_head_dim dims of each head, not the first
/// (HYV4Indexer's "flipped RoPE position").</param>
/// <param name="KNormEps">Epsilon of k_norm (HY-V4: rms_norm_eps; the others 1e-6).</param>
/// <param name="KeepInFp32">weights_proj and k_norm are stored and run in fp32 whatever the model's dtype (HY-V4's
/// <c>_keep_in_fp32_modules_strict</c>).</param>
public sealed record DsaIndexerSettings(long Heads, long HeadDim, long TopK, bool InterleavedRope, bool RopeOnLast = false, double KNormEps = 1e-6,
    bool KeepInFp32 = false);

/// <summary>
/// MiniMax-M3's lightning indexer on its <c>minimax_m3_sparse</c> layers (transformers' MiniMaxM3VLIndexer, registered
/// as <c>indexer</c> after the attention's q/k norms): q_proj (hidden → heads·head_dim), k_proj (hidden → head_dim, one
/// key shared by the heads), per-head q_norm / k_norm of <paramref name="Norm"/>'s kind, rope on the first
/// min(head_dim, rotary dim) dims with the leading entries of the attention's own cos/sin tables. Each indexer head
/// scores every key (q·k in fp32, no scale; keys after the query's position excluded), max-pools the scores over
/// blocks of <paramref name="BlockSize"/> key slots, forces the query's own block and the
/// <paramref name="LocalBlocks"/> − 1 before it, and keeps its top <paramref name="TopKBlocks"/> blocks (empty future
/// blocks never count). Query head j attends only to the blocks of indexer head j / (heads / indexer heads), on top of
/// the causal/padding mask. Its output is block indices, so nothing is differentiated through it.
/// </summary>
public sealed record BlockIndexerSettings(long Heads, long HeadDim, long BlockSize, long TopKBlocks, long LocalBlocks, NormSettings Norm);

/// <summary>
/// LongCat-Flash's "LoRA scaling" of MLA (<c>LongcatFlashMLA.forward</c>): the whole query (nope and rope parts) times
/// <paramref name="Query"/> = √(hidden / q_lora_rank), the normed kv latent (so keys' nope part and values, not the
/// shared rope key) times <paramref name="KeyValue"/> = √(hidden / kv_lora_rank).
/// </summary>
public sealed record MlaLatentScale(double Query, double KeyValue);

/// <summary>
/// ZAYA's compressed convolutional attention (<c>ZayaAttention</c> with <c>ZayaCCAProjection</c> and <c>ZayaQKNorm</c>),
/// registered o_proj, qkv_proj (q_proj, k_proj, v_proj_current, v_proj_delayed, conv_qk_depthwise, conv_qk_grouped),
/// qk_norm (temp). Padded positions are zeroed first. The q|k channels run through two causal Conv1d (depthwise of
/// kernel <paramref name="DepthwiseKernel"/>, then grouped by heads + kv heads of kernel <paramref name="GroupedKernel"/>,
/// left-padded by both kernels − 1) and get residuals: q + (q + k per head) / 2, k + that averaged over each kv group.
/// Values are half this token's projection, half the previous token's (the first token's previous one is the
/// projection of zeros). q and k are L2-normalised to √head_dim, k times the per-kv-head <c>temp</c>; rotate_half rope on
/// the first <paramref name="RotaryDim"/> dims with this layer's <paramref name="Rope"/>; eager softmax, head_dim^-0.5.
/// </summary>
public sealed record CcaAttentionSettings(long Heads, long KvHeads, long HeadDim, bool Bias, long DepthwiseKernel, long GroupedKernel,
    long RotaryDim, RopeSettings Rope, MaskSettings Mask) : AttentionSettings;

/// <summary>
/// Mistral 4's <c>get_llama_4_attn_scale</c>: after rope, the whole query is multiplied by
/// <c>1 + Beta·log(1 + floor(position / OriginalMaxPositionEmbeddings))</c> (rope_parameters'
/// <c>llama_4_scaling_beta</c> and <c>original_max_position_embeddings</c>).
/// </summary>
public sealed record Llama4QueryScale(double Beta, double OriginalMaxPositionEmbeddings);

/// <summary>
/// Llama 4's text attention: q, k, v, o; on rope layers the complex rotation of adjacent pairs, then (optionally) a
/// parameter-free L2 norm of q and k (registered as the module <c>qk_norm</c>); on no-rope layers attention
/// temperature tuning scales q by <c>1 + attn_scale·log1p(floor((pos+1)/floor_scale))</c>.
/// </summary>
public sealed record Llama4AttentionSettings(
    long Heads,
    long KvHeads,
    long HeadDim,
    bool Bias,
    bool UseRope,
    bool QkL2Norm,
    double NormEps,
    bool TemperatureTuning,
    double AttnScale,
    double FloorScale,
    MaskSettings Mask) : AttentionSettings;

/// <summary>
/// JetMoE's mixture of attention heads (<c>JetMoeAttention</c>): registered <c>experts</c> (JetMoeMoA: an output
/// bias, per-expert query projections <c>input_linear [E, kv·d, H]</c> and output projections
/// <c>output_linear [E, H, kv·d]</c>, and its own top-k gating <paramref name="Router"/>), then one shared
/// <c>kv_proj</c> (H → 2·kv·d). Each token's k selected experts give k groups of kv query heads; keys and values are
/// tiled k times (<c>repeat</c>, not GQA's interleave), so query head <c>j</c> reads kv head <c>j mod kv</c>. Each
/// group's output goes through its expert's output projection, weighted by the gate, summed, plus the bias.
/// </summary>
public sealed record MixtureOfAttentionHeadsSettings(TopKLogitsRouterSettings Router, long KvHeads, long HeadDim) : AttentionSettings;

/// <summary>
/// DBRX's attention (<c>DbrxAttention</c>): one fused <c>Wqkv</c> (H → heads·d + 2·kv·d, no bias) whose output is
/// clamped to ±<paramref name="ClipQkv"/> and split into q, k, v; rope by rotating halves; eager GQA with scale
/// d^-0.5; <c>out_proj</c>. A null clip leaves qkv unclamped (transformers 5.17's forward fails on it; earlier
/// versions skipped the clamp).
/// </summary>
public sealed record FusedQkvAttentionSettings(long Heads, long KvHeads, long HeadDim, double? ClipQkv) : AttentionSettings;
