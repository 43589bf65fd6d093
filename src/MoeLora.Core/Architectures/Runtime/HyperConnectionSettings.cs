namespace MoeLora.Core.Architectures.Runtime;

/// <summary>
/// Hyper-connections (HY-V4's <c>HYV4HyperConnection</c> / <c>HYV4HyperHead</c>, the DeepSeek-V4 form without the
/// Sinkhorn "comb" mix): the residual stream is <paramref name="Streams"/> parallel copies [B, S, streams, H]; the
/// embeddings are repeated into every stream. Around each sublayer of a layer a module (attribute
/// <paramref name="AttentionName"/> / <paramref name="FeedForwardName"/>, Parameters fn [2·streams, streams·H],
/// base [2·streams], scale [2], and a parameter-free <c>input_norm</c>) computes, in fp32, from the flattened streams
/// x̂: <c>m = (x̂ · fnᵀ) · rsqrt(mean(x̂²) + NormEps)</c>; pre = sigmoid(m_pre·scale₀ + base_pre) + Eps,
/// post = PostMagnitude·sigmoid(m_post·scale₁ + base_post) + Eps; the sublayer reads Σ_s pre_s·x_s (then its usual
/// pre-norm) and the streams become <c>post_s · out + x_s</c>. Before the final norm <paramref name="HeadName"/>
/// (hc_fn [streams, streams·H], hc_base [streams], hc_scale [1]) collapses the streams with its own pre weights.
/// The recorded hidden states are the streams (the first one the repeated embeddings), the last one the normed output.
/// <para>
/// With <paramref name="SinkhornIterations"/> &gt; 0 it is DeepSeek-V4's manifold-constrained form
/// (<c>DeepseekV4HyperConnection</c>): fn [(2 + streams)·streams, streams·H], base [(2 + streams)·streams], scale [3];
/// post = PostMagnitude·sigmoid(…) without Eps, and a third mix, <c>comb</c> [streams, streams] =
/// softmax(m_comb·scale₂ + base_comb) + Eps over its last axis, projected towards a doubly-stochastic matrix by dividing
/// by its column sums (+ Eps), then <c>SinkhornIterations − 1</c> times by row then column sums; the streams become
/// <c>post_s · out + Σ_j comb[j, s] · x_j</c>, in the streams' dtype. transformers initialises that form with base 0 and
/// scale 1 (HY-V4's: base −log(streams − 1) for pre, scale 0.01).
/// </para>
/// </summary>
/// <param name="Streams">hc_mult.</param>
/// <param name="Eps">hc_eps, added to every pre / post weight.</param>
/// <param name="NormEps">Epsilon of the unweighted RMS factor (rms_norm_eps).</param>
/// <param name="PostMagnitude">hc_magnitude (DeepSeek-V4's constant 2).</param>
/// <param name="AttentionName">Attribute of the attention sublayer's module, registered after the layer's norms.</param>
/// <param name="FeedForwardName">Attribute of the feed-forward sublayer's module, registered after it.</param>
/// <param name="HeadName">Attribute of the model's final collapse, registered after the rotary module.</param>
/// <param name="SinkhornIterations">hc_sinkhorn_iters of DeepSeek-V4's comb mix; 0: HY-V4's form without it.</param>
public sealed record HyperConnectionSettings(long Streams, double Eps, double NormEps, double PostMagnitude,
    string AttentionName = "attn_hc", string FeedForwardName = "ffn_hc", string HeadName = "hc_head", long SinkhornIterations = 0)
{
    /// <summary>DeepSeek-V4's form, with the Sinkhorn-projected stream mix.</summary>
    public bool MixesStreams => SinkhornIterations > 0;
}
