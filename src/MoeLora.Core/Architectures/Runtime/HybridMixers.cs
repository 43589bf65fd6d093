namespace MoeLora.Core.Architectures.Runtime;

// Sequence mixers of the hybrid families that are not attention (LFM2's short convolution, Mamba-2), and the pieces of
// Nemotron-H's one-mixer blocks. A mixer takes the attention slot of a layer (it reads the layer's normed input and
// its output is added to the residual), so these settings derive from AttentionSettings.

/// <summary>
/// LFM2's gated short convolution (Lfm2MoeShortConv), registered conv, in_proj, out_proj:
/// (B, C, x) = chunk(in_proj(x)ᵀ, 3) over channels, <c>y = C · conv(B · x)</c> with a depthwise causal Conv1d of
/// kernel <paramref name="Kernel"/> (<c>conv_L_cache</c>), then out_proj. Masked positions are zeroed before in_proj
/// only for batches of more than one row and one position (transformers' <c>apply_mask_to_padding_states</c>).
/// </summary>
/// <param name="Bias">conv_bias: the Conv1d, in_proj and out_proj all carry biases.</param>
public sealed record ShortConvSettings(long Kernel, bool Bias) : AttentionSettings;

/// <summary>
/// The Mamba-2 mixer as transformers' <c>torch_forward</c> computes it without a cache (NemotronHMamba2Mixer,
/// GraniteMoeHybridMambaLayer): in_proj to (z, xBC, dt); xBC through a depthwise causal Conv1d and
/// <paramref name="Act"/>; the SSD scan with <c>A = −exp(A_log)</c>, <c>dt = clamp(softplus(dt + dt_bias),
/// TimeStepClamp)</c> and the D skip; the gated RMSNorm <c>norm(y · silu(z))</c> over groups of
/// <paramref name="NormGroupSize"/> channels; out_proj. Padded positions are zeroed before in_proj and after the
/// convolution. Registered dt_bias, A_log, D (direct parameters), then act, conv1d, in_proj, norm, out_proj.
/// </summary>
/// <param name="Heads"><c>mamba_num_heads</c> / <c>mamba_n_heads</c>.</param>
/// <param name="HeadDim"><c>mamba_head_dim</c> / <c>mamba_d_head</c>.</param>
/// <param name="StateSize"><c>ssm_state_size</c> / <c>mamba_d_state</c>.</param>
/// <param name="Groups"><c>n_groups</c>: B and C are shared by Heads / Groups heads.</param>
/// <param name="Kernel">The convolution's kernel (<c>conv_kernel</c> / <c>mamba_d_conv</c>).</param>
/// <param name="ConvBias">The Conv1d has a bias.</param>
/// <param name="Bias">in_proj and out_proj have biases.</param>
/// <param name="Act">The activation after the convolution.</param>
/// <param name="NormEps">Epsilon of the gated RMSNorm.</param>
/// <param name="NormGroupSize">Channels per RMS statistic: inner / n_groups (Nemotron-H's Zamba2RMSNormGated), or
/// the whole inner width (GraniteMoeHybridRMSNormGated ignores the groups).</param>
/// <param name="TimeStepClamp">Bounds of dt in torch_forward: Nemotron-H clamps below at <c>time_step_min</c> only,
/// GraniteMoeHybrid to <c>time_step_limit</c> (the CUDA kernels differ; the runtime follows the torch path).</param>
/// <param name="MaskBatchedOnly">Padding is zeroed only when the batch has more than one row and position
/// (GraniteMoeHybrid's <c>apply_mask_to_padding_states</c>); false: whenever a mask is given (Nemotron-H).</param>
/// <param name="ChunkSize">Chunk length of the scan (the result does not depend on it beyond rounding).</param>
/// <param name="InitialDt">Random init only: dt_bias = softplus⁻¹ of a log-uniform dt in [Min, Max], floored
/// (Nemotron-H); null: dt_bias = 1 (GraniteMoeHybrid).</param>
public sealed record Mamba2MixerSettings(
    long Heads,
    long HeadDim,
    long StateSize,
    long Groups,
    long Kernel,
    bool ConvBias,
    bool Bias,
    string Act,
    double NormEps,
    long NormGroupSize,
    (double Min, double Max) TimeStepClamp,
    bool MaskBatchedOnly,
    long ChunkSize,
    (double Min, double Max, double Floor)? InitialDt) : AttentionSettings
{
    /// <summary>heads · head_dim: the width of x, z and the scan output.</summary>
    public long Inner => Heads * HeadDim;

    /// <summary>The convolved channels x | B | C.</summary>
    public long ConvDim => Inner + 2 * Groups * StateSize;
}

/// <summary>A layer without an attention sublayer (Nemotron-H's MLP and MoE blocks): its form registers only the feed-forward.</summary>
public sealed record NoAttentionSettings : AttentionSettings;

/// <summary>A layer without a feed-forward sublayer (Nemotron-H's attention and Mamba blocks): its form registers only the mixer.</summary>
public sealed record NoFeedForwardSettings : FeedForwardSettings;

/// <summary>
/// A non-gated MLP <c>down_proj(act(up_proj(x)))</c>, registered up_proj, down_proj, act_fn (NemotronHMLP, relu²).
/// </summary>
public sealed record NonGatedMlpSettings(long Intermediate, string Act, bool Bias) : FeedForwardSettings;

/// <summary>
/// Nemotron-H's MoE block (NemotronHMoE), registered experts, gate, shared_experts, fc1_latent_proj, fc2_latent_proj:
/// the DeepSeek-V3 router (<paramref name="Router"/>: fp32 logits, sigmoid, group-limited top-k on scores +
/// e_score_correction_bias), non-gated experts <c>up_proj [E, I, W]</c>, <c>down_proj [E, W, I]</c> run on the
/// latent projection of the input (W = <paramref name="LatentSize"/>, or the hidden size with identity projections),
/// plus a non-gated shared MLP on the block input.
/// </summary>
public sealed record NonGatedMoeSettings(
    SigmoidGroupLimitedRouterSettings Router,
    long Intermediate,
    string Act,
    NonGatedMlpSettings Shared,
    long? LatentSize,
    bool LatentBias) : FeedForwardSettings;

/// <summary>
/// Module names of the model around the decoder stack when they are not Llama's: <c>{Root}.{Embeddings}</c>,
/// <c>{Root}.{Layers}</c>, then <c>{Root}.{FinalNorm}</c> and the parameter-free rotary module (null: none), in
/// transformers' registration order.
/// </summary>
/// <param name="RotaryBeforeNorm">The rotary module is registered before the final norm (LFM2's pos_emb, embedding_norm).</param>
/// <param name="Root">The base model's attribute (<c>model</c>; DBRX: <c>transformer</c>).</param>
/// <param name="Layers">The decoder layers' ModuleList (<c>layers</c>; DBRX: <c>blocks</c>).</param>
/// <param name="RotaryFirst">The rotary module is registered before the embeddings (DBRX).</param>
public sealed record ModelNames(string Embeddings, string FinalNorm, string? Rotary, bool RotaryBeforeNorm = false,
    string Root = "model", string Layers = "layers", bool RotaryFirst = false)
{
    /// <summary>Llama's: embed_tokens, layers, norm, rotary_emb.</summary>
    public static ModelNames Llama { get; } = new("embed_tokens", "norm", "rotary_emb");
}
