namespace MoeLora.Core.Architectures.Runtime;

/// <summary>The feed-forward block of a decoder layer; each kind maps to one runtime block.</summary>
public abstract record FeedForwardSettings;

/// <summary>
/// <c>down_proj(act(gate_proj(x)) * up_proj(x))</c>, registered gate_proj, up_proj, down_proj, then the activation
/// module <paramref name="ActName"/> (<c>act_fn</c>; Llama 4: <c>activation_fn</c>; null: a functional activation, no
/// module). <paramref name="Names"/> renames the three projections (LFM2's w1, w3, w2). <paramref name="GlobalScale"/>:
/// the output times a learned scalar Parameter [1] of this name (Inkling's dense <c>global_scale</c>, a direct parameter,
/// so it enumerates before the projections); null: none. <paramref name="ClampLimit"/>: the SwiGLU clamp L (see
/// <see cref="SharedExpertSettings.ClampLimit"/> and <see cref="SharedExpertSettings.ClampAfterActivation"/>); null: unclamped.
/// </summary>
public sealed record GatedMlpSettings(long Intermediate, string Act, bool Bias = false, string? ActName = "act_fn", GatedMlpNames? Names = null,
    string? GlobalScale = null, double? ClampLimit = null, bool ClampAfterActivation = false) : FeedForwardSettings;

/// <summary>The attributes of a gated MLP's gate, up and down projections, in that registration order.</summary>
public sealed record GatedMlpNames(string Gate, string Up, string Down);

/// <summary>Which child a sparse MoE block registers first (named_parameters order).</summary>
public enum MoeOrder
{
    /// <summary>router, experts, then any shared expert (Mixtral, Qwen2-MoE, OLMoE, gpt-oss).</summary>
    RouterFirst,

    /// <summary>experts, router, then any shared expert (Qwen3-MoE, DeepSeek-V3, GLM-4.5, Llama 4).</summary>
    ExpertsFirst,
}

/// <summary>A sparse MoE block: router, routed experts and an optional shared expert.</summary>
/// <param name="Options">Shared-expert placement and combination, routed scaling, fp32 combine (null: plain sum).</param>
public sealed record MoeSettings(RouterSettings Router, ExpertsSettings Experts, SharedExpertSettings? Shared, MoeOrder Order,
    MoeOptions? Options = null) : FeedForwardSettings;

/// <summary>The router: its attribute name, experts, top-k, and how it turns logits into expert weights.</summary>
public abstract record RouterSettings(string Name, long NumExperts, long TopK);

/// <summary>
/// transformers-5 TopKRouter (a module holding <c>weight [E, H]</c>): softmax of the logits in fp32, top-k, optionally
/// renormalised (<c>norm_topk_prob</c>), cast to the hidden dtype (Mixtral, Qwen-MoE, OLMoE).
/// </summary>
/// <param name="LinearModule">The router is a plain nn.Linear that LoRA can wrap (Jamba's <c>router</c>).</param>
public sealed record SoftmaxTopKRouterSettings(string Name, long NumExperts, long TopK, bool NormTopK, bool LinearModule = false)
    : RouterSettings(Name, NumExperts, TopK);

/// <summary>
/// DeepSeek-V3's router (also GLM-4.5's): fp32 logits, sigmoid scores; experts chosen on scores +
/// <c>e_score_correction_bias</c> (a persistent buffer) within the best <paramref name="TopKGroups"/> of
/// <paramref name="Groups"/> groups; weights are the uncorrected scores, optionally renormalised (+1e-20), times
/// <paramref name="RoutedScalingFactor"/>.
/// </summary>
/// <param name="OtherGroupsScore">What the experts of the groups not kept score in the selection: -inf (DeepSeek-V3's
/// <c>masked_fill(..., -inf)</c>) or 0 (A.X-K2's <c>apply_group_scoring</c>, so a kept expert whose corrected score
/// is negative can lose to them).</param>
public sealed record SigmoidGroupLimitedRouterSettings(string Name, long NumExperts, long TopK, long Groups, long TopKGroups,
    bool NormTopK, double RoutedScalingFactor, double OtherGroupsScore = double.NegativeInfinity) : RouterSettings(Name, NumExperts, TopK);

/// <summary>How a softmax group-limited router scores a group of experts.</summary>
public enum GroupScore
{
    /// <summary>The group's best score (DeepSeek-V2's <c>group_limited_greedy</c>).</summary>
    Max,

    /// <summary>The sum of the group's two best scores (Mistral 4).</summary>
    TopTwoSum,
}

/// <summary>
/// Softmax router with group-limited top-k (DeepSeek-V2's <c>DeepseekV2Moe.route_tokens_to_experts</c>, Mistral 4's
/// <c>Mistral4TopkRouter</c>): softmax of the logits; the best <paramref name="TopKGroups"/> of <paramref name="Groups"/>
/// groups kept, the other experts' scores set to 0 (not -inf); top-k of those; weights times
/// <paramref name="RoutedScalingFactor"/>. One group (DeepSeek-V2's <c>greedy</c>) is plain top-k. No correction bias.
/// </summary>
/// <param name="Score">How a group is scored.</param>
/// <param name="WeightsFromScores">The weights are gathered from the unmasked scores (Mistral 4); false: they are the
/// top-k values of the masked scores (DeepSeek-V2).</param>
/// <param name="NormTopK">The weights are renormalised (sum + 1e-20) before scaling (Mistral 4's norm_topk_prob;
/// DeepSeek-V2 never renormalises).</param>
/// <param name="InFp32">Logits from fp32 input and weight, softmax in fp32 (DeepSeek-V2); false: both in the model's
/// dtype (Mistral 4).</param>
public sealed record SoftmaxGroupLimitedRouterSettings(string Name, long NumExperts, long TopK, long Groups, long TopKGroups,
    GroupScore Score, bool WeightsFromScores, bool NormTopK, double RoutedScalingFactor, bool InFp32)
    : RouterSettings(Name, NumExperts, TopK);

/// <summary>gpt-oss: logits (with a bias), top-k of the logits, softmax over the selected ones.</summary>
public sealed record TopKSoftmaxRouterSettings(string Name, long NumExperts, long TopK, bool Bias)
    : RouterSettings(Name, NumExperts, TopK);

/// <summary>
/// Llama 4: an nn.Linear router; sigmoid of the top-k logits (in fp32), which scales each expert's <em>input</em>;
/// the shared expert is added to the routed sum.
/// </summary>
public sealed record Llama4RouterSettings(string Name, long NumExperts, long TopK) : RouterSettings(Name, NumExperts, TopK);

/// <summary>How fused expert parameters are laid out and used.</summary>
public enum ExpertsLayout
{
    /// <summary>transformers-5 experts: <c>gate_up_proj [E, 2I, H]</c> (gate rows then up rows) and <c>down_proj [E, H, I]</c>, (out, in) per expert.</summary>
    GateUpOutIn,

    /// <summary>Llama 4: <c>gate_up_proj [E, H, 2I]</c> (gate columns then up columns), <c>down_proj [E, I, H]</c>, (in, out).</summary>
    Llama4InOut,

    /// <summary>
    /// gpt-oss: <c>gate_up_proj [E, H, 2I]</c> with gate/up interleaved in the last dimension, biases after each weight,
    /// clamped SwiGLU <c>(clamp(up, ±L) + 1) · g·sigmoid(1.702 g)</c>, g = clamp(gate, max = L).
    /// </summary>
    GptOssInterleaved,

    /// <summary>
    /// MiniMax-M3: <see cref="GateUpOutIn"/> tensors with the clamped SwiGLU <c>g·sigmoid(α g)·(clamp(up, ±L) + 1)</c>,
    /// g = clamp(gate, max = L), α = <see cref="ExpertsSettings.SwigluAlpha"/>; HY-V4 uses it with α 1 and no +1
    /// (<see cref="ExpertsSettings.SwigluUpShift"/>). No act_fn child.
    /// </summary>
    GateUpOutInClamped,

    /// <summary>
    /// Aria's grouped GEMM: an <c>experts</c> module holding <c>fc1</c> and <c>fc2</c> modules, each with one
    /// <c>weight</c>, fc1 <c>[E, H, 2I]</c> and fc2 <c>[E, I, H]</c> used as (in, out); per expert
    /// <c>fc2(silu(a) · b)</c> with (a, b) = chunk(fc1(x), 2) (SiLU fixed, not <c>hidden_act</c>).
    /// </summary>
    GroupedGemmInOut,
}

/// <param name="SwigluLimit">The clamp L of the clamped layouts (gpt-oss' and MiniMax-M3's <c>swiglu_limit</c>); unused by the others.</param>
/// <param name="SwigluAlpha">α of <see cref="ExpertsLayout.GateUpOutInClamped"/> (gpt-oss fixes it at 1.702).</param>
/// <param name="SwigluUpShift">What <see cref="ExpertsLayout.GateUpOutInClamped"/> adds to the clamped up half: 1 for
/// MiniMax-M3's <c>(clamp(up, ±L) + 1)</c>, 0 for HY-V4's plain <c>silu(g) · clamp(up, ±L)</c> (α 1).</param>
/// <param name="ZeroExperts">Identity ("zero computation") experts numbered after the <paramref name="NumExperts"/> real
/// ones (LongCat-Flash's <c>zero_expert_num</c>, <see cref="ExpertsLayout.GateUpOutIn"/> only): a token routed to one
/// adds its input times the weight; <c>gate_up_proj</c> still has a (never used) slice for each, <c>down_proj</c> not.</param>
/// <param name="ClampAfterActivation"><see cref="ExpertsLayout.GateUpOutInClamped"/> clamps <c>g·sigmoid(α g)</c> to at most
/// L instead of clamping g before it (Step-3.7's <c>Step3p7Experts._apply_gate</c>: α 1, no +1).</param>
public sealed record ExpertsSettings(ExpertsLayout Layout, long NumExperts, long Intermediate, string Act, double SwigluLimit = 0, double SwigluAlpha = 1.702,
    long ZeroExperts = 0, double SwigluUpShift = 1.0, bool ClampAfterActivation = false);

/// <summary>A shared expert MLP run on every token, registered after the routed experts.</summary>
/// <param name="Name"><c>shared_expert</c> or <c>shared_experts</c>.</param>
/// <param name="SigmoidGateName">Qwen2-MoE: the expert is scaled by <c>sigmoid(gate(x))</c>, a Linear(H, 1) of this name
/// registered after it (<c>shared_expert_gate</c>); null when the shared expert is added ungated.</param>
/// <param name="Bias">Its projections carry biases (ERNIE's <c>use_bias</c>, HY V3's <c>mlp_bias</c>).</param>
/// <param name="FusedGateUp">One <c>gate_up_proj</c> Linear plus <c>down_proj</c> instead of gate/up/down (MiniMax-M3);
/// it uses the routed experts' clamped SwiGLU when they have one.</param>
/// <param name="ClampLimit">DeepSeek-V4's shared expert (<c>DeepseekV4MLP</c>): <c>act(clamp(gate, max = L)) · clamp(up, ±L)</c>
/// with L = swiglu_limit, on the separate gate/up projections; null: unclamped.</param>
/// <param name="ClampAfterActivation">The gate is clamped after the activation, <c>clamp(act(gate), max = L) · clamp(up, ±L)</c>
/// (Step-3.7's <c>Step3p7MLP</c>), not before it.</param>
public sealed record SharedExpertSettings(string Name, long Intermediate, string Act, string? SigmoidGateName, string ActName = "act_fn",
    bool Bias = false, bool FusedGateUp = false, double? ClampLimit = null, bool ClampAfterActivation = false);

/// <summary>
/// JetMoE's MoE (<c>JetMoeMoE</c>), registered bias, activation, input_linear, output_linear, router: experts as
/// two JetMoeParallelExperts modules holding one weight each, <c>input_linear [E, 2·I, H]</c> (gate | up) and
/// <c>output_linear [E, H, I]</c>, the top-k gating <paramref name="Router"/> (an nn.Linear <c>router.layer</c>), and an
/// output bias [H] added to the routed sum.
/// </summary>
public sealed record ParallelExpertsMoeSettings(TopKLogitsRouterSettings Router, long Intermediate, string Act) : FeedForwardSettings;

/// <summary>
/// DBRX's FFN (<c>DbrxFFN</c>), registered <c>router.layer</c> (an nn.Linear) then <c>experts.mlp</c> (DbrxExpertGLU:
/// Parameters <c>w1</c>, <c>v1</c>, <c>w2</c> of [E·I, H], then its activation module <c>activation_fn</c>). Softmax
/// of the logits in their own dtype over all experts, top-k, divided by the <paramref name="NormalizeP"/>-norm of the
/// k (null: not normalised); expert e uses rows [e·I, (e+1)·I) of each matrix: <c>(act(x·w1ᵀ) · x·v1ᵀ) · w2</c>.
/// </summary>
public sealed record StackedExpertsMoeSettings(long NumExperts, long TopK, long Intermediate, string Act, double? NormalizeP) : FeedForwardSettings;

/// <summary>
/// ERNIE 4.5 VL's modality-isolated MoE block (<c>Ernie4_5_VLMoeMoeBlock</c>), registered <paramref name="TextName"/>,
/// <paramref name="VisionName"/> (two sparse blocks, each a router and its experts, no shared expert), then the shared
/// expert. Given text alone (no <c>moe_mm_token_type_ids</c>) transformers sends every token, padding included, through
/// the text block and never calls the vision one: output = text block(x) + shared(x), and the router logits recorded
/// for the layer are the text router's [T, E]. The vision block is parameters only (loaded, saved, LoRA targets that
/// get no gradient).
/// </summary>
public sealed record ModalityIsolatedMoeSettings(string TextName, MoeSettings Text, string VisionName, MoeSettings Vision,
    SharedExpertSettings? Shared) : FeedForwardSettings;
