namespace MoeLora.Core.Architectures.Runtime;

// The routers served by the one routed-MoE block (MoeLora.Torch's RoutedMoe), with that block's options and the
// dense fused gate/up MLP. The earlier routers (softmax top-k, group-limited, gpt-oss, Llama 4) are in
// FeedForwardSettings.cs with their own blocks.

/// <summary>How <see cref="TopKLogitsRouterSettings"/> turns the k selected logits into expert weights.</summary>
public enum TopKScore
{
    /// <summary>softmax over the k logits in fp32, cast to the hidden dtype (Cohere2-MoE, GraniteMoE).</summary>
    SoftmaxFp32,

    /// <summary>softmax over the k logits in the logits' dtype (Aria).</summary>
    Softmax,

    /// <summary>sigmoid of the k logits, optionally renormalised (Cohere2-MoE <c>expert_selection_fn="sigmoid"</c>).</summary>
    Sigmoid,
}

/// <summary>
/// Top-k of the raw router logits first, then the weights from the k selected logits only (Cohere2-MoE, GraniteMoE,
/// Aria). <paramref name="Name"/> may be dotted (a router nested in a module).
/// </summary>
/// <param name="LogitsInFp32">The logits are cast to fp32 before top-k (GraniteMoE's <c>.float()</c>).</param>
/// <param name="LinearModule">The router is an nn.Linear (Aria) rather than a module holding <c>weight</c>.</param>
public sealed record TopKLogitsRouterSettings(string Name, long NumExperts, long TopK, TopKScore Score, bool NormTopK, bool LogitsInFp32, bool LinearModule = false)
    : RouterSettings(Name, NumExperts, TopK);

/// <summary>Which module holds a sigmoid router's selection bias, and whether it is a Parameter or a persistent buffer.</summary>
public enum ScoreBiasOwner
{
    /// <summary>The MoE block itself (AFMoE's <c>expert_bias</c> Parameter; MiniMax-M2's and HY V3's buffer). A module's
    /// own tensors enumerate before its children's whatever the registration order.</summary>
    Block,

    /// <summary>The router module, after its weight (Laguna's <c>e_score_correction_bias</c> Parameter; MiniMax-M3's buffer).</summary>
    Router,

    /// <summary>A <c>moe_statics</c> submodule of the router, a <c>[1, E]</c> Parameter (ERNIE 4.5's
    /// <c>Ernie4_5_MoeStatics</c>; the only placement of <see cref="SoftmaxStaticsTopKRouterSettings"/>).</summary>
    RouterStatics,
}

/// <summary>The selection bias of a sigmoid router: its attribute name, owner, and kind.</summary>
public sealed record ScoreBias(string Name, ScoreBiasOwner Owner, bool IsParameter);

/// <summary>
/// Sigmoid router without groups: scores = sigmoid(fp32 logits, optionally soft-capped <c>tanh(l/c)·c</c>); experts
/// chosen on scores + <paramref name="Bias"/>; weights are the chosen scores, optionally renormalised (sum +
/// <paramref name="NormEps"/>), times <paramref name="Scale"/> (AFMoE, Laguna, MiniMax-M2, MiniMax-M3, HY V3).
/// <paramref name="Name"/> may be dotted (AFMoE's <c>router.gate</c>).
/// </summary>
/// <param name="Bias">The selection bias; null: experts are chosen on the scores alone (LFM2 with use_expert_bias=false).</param>
/// <param name="LinearModule">The router is an nn.Linear (AFMoE's <c>router.gate</c>) rather than a module holding <c>weight</c>.</param>
/// <param name="LinearInFp32">The logits are computed from fp32 input and weight (HY V3's <c>F.linear(h.float(),
/// weight.float())</c>) rather than in the model dtype and cast after.</param>
/// <param name="ScoresInModelDtype">The sigmoid, the top-k weights, their renormalisation and scale stay in the logits'
/// dtype (LFM2's router takes no fp32 cast) rather than in fp32.</param>
/// <param name="WeightsToModelDtype">The fp32 top-k weights are cast to the hidden states' dtype before the experts
/// (Laguna), so the experts' weighted outputs are in the model dtype.</param>
public sealed record SigmoidBiasRouterSettings(string Name, long NumExperts, long TopK, ScoreBias? Bias, bool NormTopK,
    double NormEps, double Scale, double SoftCap, bool LinearModule = false, bool LinearInFp32 = false,
    bool ScoresInModelDtype = false, bool WeightsToModelDtype = false) : RouterSettings(Name, NumExperts, TopK);

/// <summary>
/// ZAYA's router (<c>ZayaRouter</c>), registered router_states_scale (not on the first layer), down_proj (H → R, with
/// bias), router_mlp (RMSNorm, fc1, fc2 with biases and exact GELU, out_proj R → E + 1), the persistent buffer
/// balancing_biases [E + 1] (zeros, the skip expert's −1). r = down_proj(x) (+ the previous layer's r ·
/// router_states_scale from the second layer on; r is handed to the next layer); logits = router_mlp(r) over E experts
/// plus one skip expert; softmax; top-k of the detached fp32 softmax + balancing_biases; weights gathered from the
/// softmax; a chosen skip expert gets weight 0 and index 0. The recorded router logits are [T, E + 1].
/// </summary>
/// <param name="NumExperts">The real experts E (the logits have E + 1 columns).</param>
/// <param name="RouterHidden">R, <c>router_hidden_size</c>.</param>
/// <param name="UsesPreviousState">The router adds the previous layer's state (every layer but the first).</param>
/// <param name="NormEps">Epsilon of router_mlp.norm (<c>rms_norm_eps</c>).</param>
public sealed record MlpRouterSettings(string Name, long NumExperts, long TopK, long RouterHidden, bool UsesPreviousState, double NormEps)
    : RouterSettings(Name, NumExperts, TopK);

/// <summary>
/// LongCat-Flash's router (<c>LongcatFlashTopkRouter</c>): a module <paramref name="Name"/> holding the persistent buffer
/// <c>e_score_correction_bias [E]</c> and an nn.Linear <paramref name="LinearName"/> [E, H] (E counts the zero experts
/// too). In fp32: logits = <c>F.linear(x.float(), weight.float())</c> (its bias, with <c>router_bias</c>, is never
/// applied, nor any adapter on the Linear), softmax, top-k of softmax + bias, weights gathered from the softmax, not
/// renormalised, times <paramref name="Scale"/> (<c>routed_scaling_factor</c>), kept in fp32.
/// </summary>
/// <param name="LinearBias">The Linear has a (unused) bias Parameter.</param>
public sealed record SoftmaxBiasRouterSettings(string Name, string LinearName, long NumExperts, long TopK, double Scale, bool LinearBias)
    : RouterSettings(Name, NumExperts, TopK);

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
/// PhiMoE's sparsemixer (eval path; the router is an nn.Linear): top-2 picked one at a time; each pick's weight is the softmax over the logits
/// that lie within a relative 2·<paramref name="JitterEps"/> of the current maximum (the first pick masked for the
/// second). Training's Gumbel sampling is not reproduced: the runtime always routes as in eval.
/// </summary>
public sealed record SparseMixerRouterSettings(string Name, long NumExperts, double JitterEps) : RouterSettings(Name, NumExperts, 2);

/// <summary>Settings of a MoE block beyond router, experts and shared expert.</summary>
/// <param name="SharedFirst">The shared expert is registered before the routed experts (AFMoE).</param>
/// <param name="SharedAverage">(routed + shared) / 2 (Cohere2-MoE <c>shared_expert_combination_strategy="average"</c>).</param>
/// <param name="RoutedScale">The routed output is multiplied by this before the shared expert is added (Laguna, MiniMax-M3).</param>
/// <param name="SumInFp32">The routed and shared outputs are added in fp32, then cast back (HY V3's
/// <c>enable_moe_fp32_combine</c>).</param>
/// <param name="OutputNorm">A norm the block registers last and applies to its output, routed plus shared (A.X-K1's
/// <c>post_mlp_layernorm</c>); only the group-limited blocks take one.</param>
public sealed record MoeOptions(bool SharedFirst = false, bool SharedAverage = false, double RoutedScale = 1.0, bool SumInFp32 = false,
    NamedNorm? OutputNorm = null);

/// <summary>
/// A dense MLP with one fused gate/up Linear: <c>Down(act(gate) · up)</c> with (gate, up) = chunk(GateUp(x), 2)
/// (GraniteMoeShared's <c>shared_mlp</c>: input_linear / output_linear), or with the clamped SwiGLU
/// <c>g·sigmoid(α g)·(clamp(up, ±L) + 1)</c> when <paramref name="SwigluLimit"/> is set (MiniMax-M3's dense MLP).
/// </summary>
/// <param name="ActName">The activation module's attribute (parameter-free), or null where there is none.</param>
public sealed record FusedGateUpMlpSettings(long Intermediate, string Act, string GateUpName, string DownName, string? ActName,
    double? SwigluLimit = null, double SwigluAlpha = 1.702) : FeedForwardSettings;
