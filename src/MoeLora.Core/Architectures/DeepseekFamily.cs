using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// DeepSeek-V2 and V3 (native transformers code): multi-head latent attention (MLA), the first
/// <c>first_k_dense_replace</c> layers dense, the rest MoE with <c>n_shared_experts</c> shared experts fused into one
/// MLP of <c>moe_intermediate_size * n_shared_experts</c>. V3's router also holds <c>e_score_correction_bias</c>, a
/// persistent buffer that is not a parameter.
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
        if (!v3) return spec with { RuntimeUnavailable = "DeepSeek-V2's softmax router (greedy / group-limited) and complex-pair rope in MLA" };

        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6));
        var ropeSettings = RopeSettings.Read(c, 10000.0, rope);
        // Softmax scale (nope+rope)^-0.5; a scaled rope with mscale_all_dim multiplies it by mscale² (yarn_apply_mscale).
        var scaling = Math.Pow(qkHead, -0.5);
        if (ropeSettings.Type != "default" && ropeSettings.MScaleAllDim is { } mad && mad != 0 && ropeSettings.Factor is { } f)
            scaling *= Math.Pow(RopeSettings.YarnMScale(f, mad), 2);
        // q_a_layernorm and kv_a_layernorm are built without eps, so they keep DeepseekV3RMSNorm's 1e-6.
        var attention = new MlaAttentionSettings(heads, qLoraRank, kvLoraRank, nope, rope, vHead, attnBias,
            c.Bool("rope_interleave", true), scaling, LowRankNormEps: 1e-6);
        var sparse = new MoeSettings(
            new SigmoidGroupLimitedRouterSettings("gate", experts, topK, groups, topKGroups, c.Bool("norm_topk_prob", true), scalingFactor),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
            new SharedExpertSettings("shared_experts", sharedInter, act, SigmoidGateName: null), MoeOrder.ExpertsFirst);
        var dense = new GatedMlpSettings(inter, act);
        var runtimeLayers = Enumerable.Range(0, (int)layers)
            .Select(i => new DecoderLayerRuntime(attention, "mlp", moeSet.Contains(i) ? sparse : dense, norm, norm)).ToList();
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, ropeSettings, runtimeLayers),
        };
    }
}
