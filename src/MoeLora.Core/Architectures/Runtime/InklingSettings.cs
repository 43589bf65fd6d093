namespace MoeLora.Core.Architectures.Runtime;

/// <summary>
/// Inkling's attention (<c>InklingAttention</c>), registered q_proj, k_proj, v_proj, r_proj, o_proj, k_sconv, v_sconv,
/// q_norm, k_norm, rel_logits_proj: no rotary embedding; k and v each pass a residual short convolution
/// (<see cref="SublayerConvs"/>'s block) before the head split; q and k are RMS-normed per head and the softmax scale is
/// 1 / head_dim. A learned relative-position bias is added to the scores: <c>r_proj</c> gives each query token
/// <paramref name="DRel"/> mixing weights per head over the bank <c>rel_logits_proj.proj [d_rel, extent]</c>, read at
/// the backward distance (query index − key index, zero outside [0, extent)).
/// </summary>
/// <param name="RelExtent">The bias bank's length: sliding_window_size on sliding layers, rel_extent on global ones.</param>
/// <param name="ConvKernel">Kernel of the k / v short convolutions (<c>conv_kernel_size</c>).</param>
/// <param name="LogScaling">Global layers' logarithmic scaling of queries and bias (null: none, as on sliding layers).</param>
public sealed record InklingAttentionSettings(long Heads, long KvHeads, long HeadDim, long DRel, long RelExtent, long ConvKernel,
    double NormEps, MaskSettings Mask, InklingLogScaling? LogScaling) : AttentionSettings;

/// <summary>
/// <c>log_scaling_n_floor</c> / <c>log_scaling_alpha</c>: query i (0-based) and its bias row are multiplied by
/// <c>1 + Alpha·log(max((i + 1) / NFloor, 1))</c>, in fp32.
/// </summary>
public sealed record InklingLogScaling(double NFloor, double Alpha);

/// <summary>
/// Inkling's MoE (<c>InklingMoE</c>), registered gate (InklingTopkRouter: weight [E + S, H], global_scale [1], the
/// persistent buffer e_score_correction_bias [E]), experts (transformers-5 fused experts) and shared_experts (3-D
/// gate_proj / up_proj [S, I, H], down_proj [S, H, I]). The router scores routed and shared experts with one matrix;
/// top-k of sigmoid(routed logits) + bias picks the routed experts, then the chosen routed and all shared logits'
/// log-sigmoids are softmax-normalised together and scaled by route_scale · global_scale: the routed part weights the
/// routed experts, the shared part (the shared "gammas") each shared expert.
/// </summary>
public sealed record InklingMoeSettings(long NumExperts, long SharedExperts, long TopK, long Intermediate, string Act, double RouteScale)
    : FeedForwardSettings;

/// <summary>
/// Inkling's residual short convolutions after each sublayer (<c>attn_sconv</c> on the attention output,
/// <c>mlp_sconv</c> on the feed-forward output, registered after the layer's norms): in fp32, padded positions zeroed,
/// a causal depthwise Conv1d without bias (<c>conv1d</c>) plus its input.
/// </summary>
public sealed record SublayerConvs(long Kernel, string AfterAttention = "attn_sconv", string AfterFeedForward = "mlp_sconv");
