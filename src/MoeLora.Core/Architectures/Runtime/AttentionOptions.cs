namespace MoeLora.Core.Architectures.Runtime;

/// <summary>How a standard attention rotates q and k.</summary>
public enum RotaryStyle
{
    /// <summary>Llama's rotate_half on the first <see cref="StandardAttentionSettings.RotaryDim"/> dims of each head.</summary>
    Half,

    /// <summary>
    /// Rotation of adjacent pairs (x[2i], x[2i+1]) by the i-th frequency (angles repeat-interleaved), the products in
    /// fp32, then cast back: GLM-style rope of ERNIE 4.5 and Cohere's rope. Whether the cos/sin tables are rounded to
    /// the activations' dtype first is <see cref="StandardAttentionOptions.RopeTablesInFp32"/>.
    /// </summary>
    InterleavedPairs,

    /// <summary>
    /// No rotary embedding on this layer (EXAONE's global NoPE layers, AFMoE / Cohere2 full-attention layers,
    /// GraniteMoE-SWA layers whose layer_rope_theta is 0).
    /// </summary>
    None,
}

/// <summary>How a gate on the attention output (before o_proj) turns its projection into weights.</summary>
public enum OutputGateKind
{
    /// <summary><c>out · sigmoid(gate_proj(x))</c> (AFMoE).</summary>
    Sigmoid,

    /// <summary><c>out · softplus(g_proj(x) in fp32)</c> (Laguna).</summary>
    Softplus,
}

/// <summary>An attention output gate: a bias-free Linear registered after q/k norms, one weight per head or per element.</summary>
public sealed record OutputGate(string Name, OutputGateKind Kind, bool PerHead);

/// <summary>
/// What a standard attention does beyond Llama's, each default meaning "as Llama": null options are Llama's attention.
/// </summary>
/// <param name="Rope">This layer's own rotary table (per-layer-type rope: MiMo-V2-Flash's sliding and full layers,
/// Laguna, Mellum; GraniteMoE-SWA's layer_rope_theta); null: the model's <see cref="DecoderRuntime.Rope"/>.</param>
/// <param name="Rotary">How q and k are rotated, or not at all.</param>
/// <param name="RopeTablesInFp32">Interleaved pairs with the cos/sin tables kept in fp32 (ERNIE 4.5's rotary
/// embedding returns them "in full precision"); false: rounded to the activations' dtype first (Cohere).</param>
/// <param name="QkNormAfterRope">Per-head q/k norms run after the rotation (HunYuan's query_layernorm / key_layernorm)
/// instead of before it.</param>
/// <param name="QNormName">Attribute of the q norm (<c>q_norm</c>; HunYuan: <c>query_layernorm</c>).</param>
/// <param name="KNormName">Attribute of the k norm (<c>k_norm</c>; HunYuan: <c>key_layernorm</c>).</param>
/// <param name="QkNormType">How q_norm / k_norm apply their weight (MiniMax-M3: <see cref="NormKind.RmsOnePlusWeight"/>).</param>
/// <param name="VHeadDim">Head size of v (and of o_proj's input) when it differs from head_dim (MiMo-V2-Flash).</param>
/// <param name="ValueScale">v is multiplied by this after its projection (MiMo-V2-Flash's attention_value_scale).</param>
/// <param name="Scaling">Softmax scale instead of head_dim^-0.5 (Granite's attention_multiplier).</param>
/// <param name="GateInQuery">q_proj also yields the output gate: per head its 2·head_dim outputs are the query, then
/// the gate, and the attention output is multiplied by sigmoid(gate) before o_proj (Qwen3-Next, Qwen3.5).</param>
/// <param name="SoftmaxInFp32">False: the attention softmax runs in the activations' dtype after subtracting the row
/// maximum (MiMo-V2-Flash's eager attention), not in fp32.</param>
/// <param name="Gate">An output gate before o_proj (AFMoE, Laguna).</param>
/// <param name="OName">Attribute of the output projection (<c>o_proj</c>; LFM2: <c>out_proj</c>).</param>
/// <param name="BlockIndexer">MiniMax-M3's sparse layers: a lightning indexer that restricts each query head to its
/// selected key blocks (null: every key the causal/padding mask allows).</param>
public sealed record StandardAttentionOptions(
    RopeSettings? Rope = null,
    RotaryStyle Rotary = RotaryStyle.Half,
    bool RopeTablesInFp32 = false,
    bool QkNormAfterRope = false,
    string QNormName = "q_norm",
    string KNormName = "k_norm",
    NormKind QkNormType = NormKind.Rms,
    long? VHeadDim = null,
    double ValueScale = 1.0,
    double? Scaling = null,
    bool GateInQuery = false,
    bool SoftmaxInFp32 = true,
    OutputGate? Gate = null,
    string OName = "o_proj",
    BlockIndexerSettings? BlockIndexer = null);
