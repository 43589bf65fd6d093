namespace MoeLora.Core.Architectures.Runtime;

/// <summary>
/// MiniMax's lightning attention (MiniMaxLightningAttention), a linear attention whose state decays per head, as
/// transformers computes a forward without cache: <c>q, k, v = split(act(qkv_proj(x)))</c> per head (padded positions
/// zeroed first, <c>apply_mask_to_padding_states</c>), then block by block of <paramref name="BlockSize"/> positions
/// the decayed intra-block product plus the query times the carried state <c>Σ decay · kᵀv</c>, the RMSNorm
/// <c>norm</c> over heads·head_dim (epsilon 1e-6, the class default, not <c>rms_norm_eps</c>), the gate
/// <c>sigmoid(output_gate(x))</c> and out_proj. Registered act_fn, norm, qkv_proj, out_proj, output_gate, and the
/// persistent decay buffers slope_rate, query_decay, key_decay, diagonal_decay (all derived from the layer index).
/// </summary>
/// <param name="LayerIndex">The layer's index: the slope rates fall linearly with depth.</param>
/// <param name="NumLayers"><c>num_hidden_layers</c>.</param>
public sealed record LightningAttentionSettings(long Heads, long HeadDim, long BlockSize, string Act, int LayerIndex, long NumLayers) : AttentionSettings
{
    /// <summary>heads · head_dim: the width of q, k, v, the norm and the gate.</summary>
    public long Inner => Heads * HeadDim;
}
