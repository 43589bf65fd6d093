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
    Llama4QueryScale? QueryScale = null) : AttentionSettings;

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
