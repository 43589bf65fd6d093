namespace MoeLora.Core.Architectures.Runtime;

/// <summary>How a standard attention rotates q and k.</summary>
public enum RotaryStyle
{
    /// <summary>Llama's rotate_half on the first <see cref="StandardAttentionSettings.RotaryDim"/> dims of each head.</summary>
    Half,

    /// <summary>
    /// GLM-style rotation of adjacent pairs (x[2i], x[2i+1]) by the i-th frequency, cos/sin and the products in fp32,
    /// then cast back (ERNIE 4.5's <c>apply_rotary_pos_emb</c>).
    /// </summary>
    InterleavedPairs,

    /// <summary>No rotary embedding on this layer (EXAONE's global NoPE layers).</summary>
    None,
}

/// <summary>
/// What a standard attention does beyond Llama's, each default meaning "as Llama": null options are Llama's attention.
/// </summary>
/// <param name="Rope">This layer's own rotary table (per-layer-type rope, e.g. MiMo-V2-Flash's sliding and full layers);
/// null: the model's <see cref="DecoderRuntime.Rope"/>.</param>
/// <param name="Rotary">How q and k are rotated.</param>
/// <param name="QkNormAfterRope">Per-head q/k norms run after the rotation (HunYuan's query_layernorm / key_layernorm)
/// instead of before it.</param>
/// <param name="VHeadDim">Head size of v (and of o_proj's input) when it differs from head_dim (MiMo-V2-Flash).</param>
/// <param name="ValueScale">v is multiplied by this after its projection (MiMo-V2-Flash's attention_value_scale).</param>
/// <param name="SoftmaxInFp32">False: the attention softmax runs in the activations' dtype after subtracting the row
/// maximum (MiMo-V2-Flash's eager attention), not in fp32.</param>
/// <param name="QNormName">Attribute of the q norm (<c>q_norm</c>; HunYuan: <c>query_layernorm</c>).</param>
/// <param name="KNormName">Attribute of the k norm (<c>k_norm</c>; HunYuan: <c>key_layernorm</c>).</param>
public sealed record StandardAttentionOptions(
    RopeSettings? Rope = null,
    RotaryStyle Rotary = RotaryStyle.Half,
    bool QkNormAfterRope = false,
    long? VHeadDim = null,
    double ValueScale = 1.0,
    bool SoftmaxInFp32 = true,
    string QNormName = "q_norm",
    string KNormName = "k_norm");
