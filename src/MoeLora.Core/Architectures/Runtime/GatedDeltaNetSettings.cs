namespace MoeLora.Core.Architectures.Runtime;

/// <summary>How a Gated DeltaNet projects the hidden states into q, k, v, the output gate z, β's logit b and the decay's a.</summary>
public enum DeltaNetProjections
{
    /// <summary>
    /// Qwen3-Next: <c>in_proj_qkvz</c> and <c>in_proj_ba</c>, their outputs grouped per key head
    /// (<c>[q, k, v·r, z·r]</c> and <c>[b·r, a·r]</c> for each of the key heads, r = value heads / key heads);
    /// registered conv1d, in_proj_qkvz, in_proj_ba, norm, out_proj.
    /// </summary>
    FusedQkvzBa,

    /// <summary>
    /// Qwen3.5: <c>in_proj_qkv</c> (all q, then all k, then all v), <c>in_proj_z</c>, <c>in_proj_b</c>, <c>in_proj_a</c>;
    /// registered conv1d, norm, out_proj, then the four projections.
    /// </summary>
    Split,
}

/// <summary>
/// A Gated DeltaNet token mixer (transformers' <c>Qwen3NextGatedDeltaNet</c> / <c>Qwen3_5MoeGatedDeltaNet</c>, torch
/// fallback path), held by the decoder layer as <c>linear_attn</c> (<see cref="PreNormLayer"/>). Its own parameters <c>dt_bias</c> and <c>A_log</c>
/// [value heads] enumerate first, then a depthwise causal <c>conv1d</c> (no bias) over q|k|v followed by
/// <paramref name="ConvAct"/>, l2-normed q and k (each key head serving value heads / key heads value heads),
/// β = sigmoid(b), g = −exp(A_log)·softplus(a + dt_bias), the chunked gated delta rule, the gated RMSNorm
/// <c>norm</c> over <paramref name="ValueHeadDim"/> (gate silu(z)) and <c>out_proj</c>. Padded positions
/// (attention_mask 0) are zeroed on the way in, as transformers does for left-padded batches.
/// </summary>
/// <param name="NormEps">Epsilon of the gated RMSNorm (<c>rms_norm_eps</c>).</param>
/// <param name="ConvAct">Activation after the convolution (Qwen3-Next: silu; Qwen3.5: <c>hidden_act</c>).</param>
public sealed record GatedDeltaNetSettings(
    long KeyHeads,
    long ValueHeads,
    long KeyHeadDim,
    long ValueHeadDim,
    long ConvKernel,
    DeltaNetProjections Projections,
    double NormEps,
    string ConvAct = "silu") : AttentionSettings
{
    /// <summary>Channels of the convolution: q and k (key heads · key head dim each) and v.</summary>
    public long ConvDim => 2 * KeyHeads * KeyHeadDim + ValueHeads * ValueHeadDim;

    /// <summary>
    /// The pre-norm layer holding a Gated DeltaNet: linear_attn, <paramref name="feedForwardName"/>, input_layernorm,
    /// post_attention_layernorm, as Qwen3-Next and Qwen3.5 register them.
    /// </summary>
    public static LayerForm PreNormLayer(NormSettings inputNorm, NormSettings postAttentionNorm, string feedForwardName = "mlp") =>
        new(["linear_attn", feedForwardName, "input_layernorm", "post_attention_layernorm"],
            new NamedNorm("input_layernorm", inputNorm), null, new NamedNorm("post_attention_layernorm", postAttentionNorm), null,
            AttentionName: "linear_attn");
}

/// <summary>
/// Kimi delta attention (transformers' <c>KimiLinearDeltaAttention</c>, torch fallback path, a full forward without
/// cache), held as <c>self_attn</c>: q_proj, k_proj, v_proj (hidden → heads·head_dim each, no bias), a depthwise causal
/// <c>conv1d</c> over q|k|v (no bias) followed by <paramref name="ConvAct"/>, <c>forget_gate</c> (its own
/// <c>dt_bias</c> [heads·head_dim] and <c>A_log</c> [1, 1, heads, 1], then f_a_proj hidden → head_dim and f_b_proj
/// head_dim → heads·head_dim) giving g = −exp(A_log)·softplus(f_b(f_a(x)) + dt_bias) per key channel, β =
/// sigmoid(b_proj(x)), the chunked delta rule with l2-normed q and k (one decay per key channel), <c>o_norm</c> (a gated
/// RMSNorm over head_dim: weight in fp32, gate sigmoid(g_b_proj(g_a_proj(x)))) and o_proj. Padded positions are zeroed
/// on the way in, as transformers does with its 2-D recurrent mask.
/// </summary>
/// <param name="NormEps">Epsilon of o_norm (<c>rms_norm_eps</c>).</param>
/// <param name="ConvAct">Activation after the convolution (<c>hidden_act</c>).</param>
public sealed record KimiDeltaAttentionSettings(long Heads, long HeadDim, long ConvKernel, double NormEps, string ConvAct) : AttentionSettings
{
    /// <summary>The width of each of q, k and v: heads · head_dim.</summary>
    public long Width => Heads * HeadDim;
}
