using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// DeepSeek-V2 and V3 (native transformers code): multi-head latent attention (MLA), the first
/// <c>first_k_dense_replace</c> layers dense, the rest MoE with <c>n_shared_experts</c> shared experts fused into one
/// MLP of <c>moe_intermediate_size * n_shared_experts</c>. V3's router also holds <c>e_score_correction_bias</c>, a
/// persistent buffer that is not a parameter.
/// Runtime: V3 and V2 (greedy and group-limited routing) are checked against transformers fixtures. V2, read from transformers 5.17's modeling_deepseek_v2.py, it is V3's
/// MLA with <c>apply_rotary_emb</c>'s complex-pair rope and DeepseekV2Attention's plain (nope+rope)^-0.5 scaling (no
/// yarn mscale), and <c>DeepseekV2Moe.route_tokens_to_experts</c>'s softmax router (see <see cref="V2Router"/>); the
/// shared experts are always added, and mlp_bias applies to the dense and shared MLPs.
/// </summary>
internal sealed class DeepseekFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["deepseek_v2", "deepseek_v3"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var type = c.ModelType!;
        var v3 = type == "deepseek_v3";
        var p = v3 ? "DeepseekV3" : "DeepseekV2";
        var vocab = c.Positive("vocab_size", v3 ? 129280 : 102400);
        var hidden = c.Positive("hidden_size", v3 ? 7168 : 4096);
        var inter = c.Positive("intermediate_size", v3 ? 18432 : 11008);
        var moeInter = c.Positive("moe_intermediate_size", v3 ? 2048 : 1407);
        var layers = c.Positive("num_hidden_layers", v3 ? 61 : 30);
        var heads = c.Positive("num_attention_heads", v3 ? 128 : 32);
        var kv = c.IntOrNull("num_key_value_heads", v3 ? 128 : 32) ?? heads;
        var experts = c.FirstInt("n_routed_experts", "num_experts") ?? (v3 ? 256 : 64);
        var shared = c.IntOrNull("n_shared_experts", v3 ? 1 : 2);
        var topK = c.Int("num_experts_per_tok", v3 ? 8 : 6);
        var firstDense = c.Int("first_k_dense_replace", v3 ? 3 : 0);
        var qLoraRank = c.IntOrNull("q_lora_rank", 1536);
        var kvLoraRank = c.Positive("kv_lora_rank", 512);
        var rope = c.Positive("qk_rope_head_dim", 64);
        var nope = c.Positive("qk_nope_head_dim", 128);
        var vHead = c.Positive("v_head_dim", 128);
        var attnBias = c.Bool("attention_bias", false);
        var mlpBias = !v3 && c.Bool("mlp_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var qkHead = nope + rope;
        // v4 built the shared experts only when n_shared_experts was set; transformers 5 always builds them.
        var hasShared = layout == Layout.V5 || shared is not null;
        var sharedInter = moeInter * (shared ?? 0);

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers, i => i >= firstDense);
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder(p + "ForCausalLM", layout);
        Blocks.CausalLm(b, p, vocab, hidden, layers, tie, i =>
        {
            Blocks.Mla(b, p + "Attention", p + "RMSNorm", hidden,
                new Blocks.MlaShape(heads, qLoraRank, kvLoraRank, nope, rope, vHead, attnBias));
            if (moeSet.Contains(i))
            {
                using (b.Scope("mlp", v3 ? "DeepseekV3MoE" : "DeepseekV2Moe", ModuleLocation.Other))
                {
                    if (layout == Layout.V5) Blocks.FusedExperts(b, p + "Experts", experts, hidden, moeInter, actClass);
                    else Blocks.PerExpertMlps(b, v3 ? "DeepseekV3NaiveMoe" : "DeepseekV2Experts", p + "MLP", experts, hidden, moeInter, actClass);

                    if (v3 || layout == Layout.V5) Blocks.TopKRouter(b, "gate", p + "TopkRouter", experts, hidden, correctionBias: v3);
                    else b.Linear("gate", hidden, experts, location: ModuleLocation.Router);

                    if (hasShared)
                        Blocks.GatedMlp(b, "shared_experts", p + "MLP", hidden, sharedInter, mlpBias, actClass, ModuleLocation.SharedExpert);
                }
            }
            else
            {
                Blocks.GatedMlp(b, "mlp", p + "MLP", hidden, inter, mlpBias, actClass, ModuleLocation.Mlp);
            }
            b.RmsNorm("input_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
        });

        var groups = c.Int("n_group", 8);
        var topKGroups = c.Int("topk_group", 4);
        var scalingFactor = c.Double("routed_scaling_factor", 2.5);
        var routing = v3
            ? $"sigmoid scores + e_score_correction_bias, group-limited ({groups} groups, top {topKGroups}), top-{topK} of {experts}, scaled by {scalingFactor}"
            : $"{c.String("scoring_func", "softmax")} over {experts} experts, {c.String("topk_method", "greedy")} top-{topK}";
        var moe = new MoeFacts(experts, topK, shared ?? 0, moeInter, hasShared ? sharedInter : 0, moeLayers, denseLayers, routing);
        var spec = Blocks.Spec(c, type, b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6));
        var ropeSettings = RopeSettings.Read(c, 10000.0, rope);
        MlaAttentionSettings attention;
        RouterSettings router;
        if (v3)
        {
            // q_a_layernorm and kv_a_layernorm are built without eps, so they keep DeepseekV3RMSNorm's 1e-6.
            attention = new MlaAttentionSettings(heads, qLoraRank, kvLoraRank, nope, rope, vHead, attnBias,
                c.Bool("rope_interleave", true), ropeSettings.MlaSoftmaxScale(qkHead), LowRankNormEps: 1e-6);
            router = new SigmoidGroupLimitedRouterSettings("gate", experts, topK, groups, topKGroups, c.Bool("norm_topk_prob", true), scalingFactor);
        }
        else
        {
            var (v2Router, missing) = V2Router(c, experts, topK);
            if (v2Router is null) return spec with { RuntimeUnavailable = missing };
            // DeepseekV2Attention: scaling is (nope+rope)^-0.5 with no yarn mscale; apply_rotary_emb rotates complex pairs.
            attention = new MlaAttentionSettings(heads, qLoraRank, kvLoraRank, nope, rope, vHead, attnBias,
                RopeInterleave: false, Math.Pow(qkHead, -0.5), LowRankNormEps: 1e-6, RopeComplexPairs: true);
            router = v2Router;
        }
        var sparse = new MoeSettings(router,
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
            new SharedExpertSettings("shared_experts", sharedInter, act, SigmoidGateName: null, Bias: mlpBias), MoeOrder.ExpertsFirst);
        var dense = new GatedMlpSettings(inter, act, mlpBias);
        var runtimeLayers = Enumerable.Range(0, (int)layers)
            .Select(i => new DecoderLayerRuntime(attention, "mlp", moeSet.Contains(i) ? sparse : dense, norm, norm)).ToList();
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, ropeSettings, runtimeLayers),
        };
    }

    /// <summary>
    /// DeepseekV2Moe.route_tokens_to_experts (transformers 5.17): softmax of fp32 logits, then "greedy" (plain top-k,
    /// one group here) or "group_limited_greedy" (groups scored by their best expert, the best topk_group kept, the
    /// rest zeroed); the top-k values times routed_scaling_factor (DeepseekV2Config's default 1.0), never renormalised
    /// (norm_topk_prob is unused). Any other topk_method, or groups that do not split the experts, leave transformers
    /// without routing weights at the first forward: the runtime refuses those configs, naming why.
    /// </summary>
    /// <remarks>
    /// DeepSeek-OCR-2's text MoE (DeepseekOcr2TextMoe) is generated from DeepseekV2Moe and its text config from DeepseekV2Config
    /// (same router fields and defaults), so <see cref="DeepseekOcr2Family"/> reads its router here.
    /// </remarks>
    internal static (SoftmaxGroupLimitedRouterSettings? Router, string? Missing) V2Router(ModelConfig c, long experts, long topK)
    {
        // DeepseekV2Config has no num_experts_per_tok default: transformers' top-k fails without one.
        if (!c.Has("num_experts_per_tok")) return (null, "DeepSeek-V2 without num_experts_per_tok (transformers' router has no top-k then)");
        if (topK > experts) return (null, $"DeepSeek-V2 choosing {topK} of {experts} experts");
        var scale = c.Double("routed_scaling_factor", 1.0);
        var method = c.String("topk_method", "greedy");
        if (method == "greedy")
            return (new SoftmaxGroupLimitedRouterSettings("gate", experts, topK, 1, 1, GroupScore.Max, false, false, scale, true), null);
        if (method != "group_limited_greedy")
            return (null, $"DeepSeek-V2's topk_method '{method}' (transformers routes only 'greedy' and 'group_limited_greedy')");
        var groups = c.IntOrNull("n_group", null);
        var topKGroups = c.IntOrNull("topk_group", null);
        if (groups is not > 0 || topKGroups is not > 0 || experts % groups.Value != 0 || topKGroups > groups)
            return (null, $"DeepSeek-V2's group_limited_greedy needs n_group dividing {experts} experts and 0 < topk_group <= n_group (n_group {groups?.ToString() ?? "null"}, topk_group {topKGroups?.ToString() ?? "null"})");
        return (new SoftmaxGroupLimitedRouterSettings("gate", experts, topK, groups.Value, topKGroups.Value, GroupScore.Max, false, false, scale, true), null);
    }
}
