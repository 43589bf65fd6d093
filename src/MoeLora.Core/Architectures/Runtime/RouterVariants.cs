namespace MoeLora.Core.Architectures.Runtime;

/// <summary>
/// ERNIE 4.5's TopK router: a module holding <c>weight [E, H]</c> and a <c>moe_statics</c> submodule whose frozen
/// parameter <c>e_score_correction_bias [1, E]</c> biases selection only. In fp32: softmax of the logits, top-k of
/// softmax + bias, weights gathered from the softmax, divided by <c>clamp(sum, min = NormMin)</c>, cast to the
/// hidden dtype. Both tensors are kept in fp32 (<c>_keep_in_fp32_modules_strict</c>).
/// </summary>
/// <param name="NormMin"><c>moe_norm_min</c>.</param>
public sealed record SoftmaxStaticsTopKRouterSettings(string Name, long NumExperts, long TopK, double NormMin)
    : RouterSettings(Name, NumExperts, TopK);

/// <summary>
/// HunYuan's gate: a module <paramref name="Name"/> holding an fp32 nn.Linear <paramref name="LinearName"/> [E, H]
/// (created with dtype float32, so it stays fp32 in a half-precision model); softmax of the fp32 logits, top-k,
/// renormalised, kept in fp32.
/// </summary>
public sealed record LinearSoftmaxTopKRouterSettings(string Name, string LinearName, long NumExperts, long TopK)
    : RouterSettings(Name, NumExperts, TopK);

/// <summary>
/// HY V3's router: a module holding <c>weight [E, H]</c>; fp32 logits, sigmoid scores, top-k of scores + the MoE
/// block's persistent buffer <paramref name="BiasName"/> (fp32, selection only, registered after the experts), weights
/// from the uncorrected scores renormalised (+1e-20) and times <paramref name="ScalingFactor"/>.
/// </summary>
public sealed record SigmoidBlockBiasTopKRouterSettings(string Name, long NumExperts, long TopK, string BiasName, double ScalingFactor)
    : RouterSettings(Name, NumExperts, TopK);
