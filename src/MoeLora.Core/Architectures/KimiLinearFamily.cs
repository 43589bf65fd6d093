using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Kimi Linear (<c>kimi_linear</c>): a hybrid of Kimi Delta Attention (KDA, linear attention) and MLA full attention
/// without rotary embedding, chosen per layer by <c>layer_types</c>, with DeepSeek-V3's MoE block (experts, a sigmoid
/// TopK router whose <c>e_score_correction_bias</c> is a persistent buffer, one shared-experts MLP of
/// <c>moe_intermediate_size · n_shared_experts</c>) on the layers <c>mlp_layer_types</c> marks "sparse".
/// <para>
/// KimiLinearConfig's attribute_map lets the checkpoint spell fields differently (num_experts, num_experts_per_token,
/// num_shared_experts, moe_renormalize, num_expert_group), and its <c>linear_attn_config</c> sub-dict overrides the
/// linear_* fields and, when it lists <c>full_attn_layers</c> and <c>kda_layers</c> (1-based), the layer types. Without
/// them every 4th layer after the first is full attention; without <c>mlp_layer_types</c> the first
/// <c>first_k_dense_replace</c> (a plain kwarg, default 1) layers are dense.
/// </para>
/// <para>
/// KDA (KimiLinearDeltaAttention): q/k/v_proj to Q = linear_num_heads·linear_head_dim, one depthwise Conv1d over 3·Q
/// (no bias), a forget gate (own dt_bias [Q] and A_log [1, 1, heads, 1], then f_a_proj / f_b_proj), b_proj, g_a_proj /
/// g_b_proj, a gated RMSNorm over the head dim and o_proj.
/// </para>
/// <para>
/// v4 means the on-disk checkpoint layout (what save_pretrained writes; module classes reuse the v5 names): every
/// feed-forward block is <c>block_sparse_moe</c>, the forget gate's tensors sit directly on self_attn, the conv is
/// split into q_conv1d / k_conv1d / v_conv1d [Q, 1, K], and routed experts are <c>experts.{e}.w1/w3/w2</c>.
/// </para>
/// <para>
/// Runtime: KDA as transformers' torch fallback computes it (the chunked delta rule with one decay per key channel,
/// checked against the token-by-token recurrence), MLA with the rope dims left unrotated, DeepSeek-V3's sigmoid
/// group-limited router with shared experts. Checkpoints load from the saved layout (the three convolutions
/// concatenated into conv1d, as transformers' conversion mapping does).
/// </para>
/// </summary>
internal sealed class KimiLinearFamily : IArchitecture
{
    private const string P = "KimiLinear";

    public IReadOnlyList<string> ModelTypes => ["kimi_linear"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: KimiLinearConfig.
        var vocab = c.Positive("vocab_size", 163840);
        var hidden = c.Positive("hidden_size", 2304);
        var inter = c.Positive("intermediate_size", 9216);
        var moeInter = c.Positive("moe_intermediate_size", 1024);
        var layers = c.Positive("num_hidden_layers", 27);
        var heads = c.Positive("num_attention_heads", 32);
        var kv = c.IntOrNull("num_key_value_heads", 32) ?? heads;
        var shared = c.FirstInt("num_shared_experts", "n_shared_experts") ?? 1;
        var qLoraRank = c.IntOrNull("q_lora_rank", null);
        var kvLoraRank = c.Positive("kv_lora_rank", 512);
        var rope = c.Positive("qk_rope_head_dim", 64);
        var nope = c.Positive("qk_nope_head_dim", 128);
        var vHead = c.IntOrNull("v_head_dim", 128)
            ?? throw new ConfigException("config field 'v_head_dim' must be an integer for kimi_linear MLA layers");
        var experts = c.FirstInt("num_experts", "num_local_experts") ?? 256;
        var topK = c.FirstInt("num_experts_per_token", "num_experts_per_tok") ?? 8;
        var bias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        var linear = c.Sub("linear_attn_config");
        var kHeadDim = linear?.IntOrNull("head_dim", null) ?? c.Positive("linear_head_dim", 128);
        var kHeads = linear?.IntOrNull("num_heads", null) ?? c.Positive("linear_num_heads", 32);
        var convK = linear?.IntOrNull("short_conv_kernel_size", null) ?? c.Positive("linear_conv_kernel_dim", 4);
        var layerTypes = LayerTypes(c, linear, layers);
        var mlpTypes = c.StringList("mlp_layer_types")
            ?? Enumerable.Range(0, (int)layers).Select(i => i < c.Int("first_k_dense_replace", 1) ? "dense" : "sparse").ToList();
        if (mlpTypes.Count < layers)
            throw new ConfigException($"config field 'mlp_layer_types' has {mlpTypes.Count} entries for {layers} layers");

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers, i => mlpTypes[i] == "sparse");
        var moeSet = moeLayers.ToHashSet();
        var q = kHeadDim * kHeads;
        var sharedInter = moeInter * shared;
        var ffName = layout == Layout.V5 ? "mlp" : "block_sparse_moe";

        var b = new TreeBuilder(P + "ForCausalLM", layout);
        using (b.Scope("model", P + "Model"))
        {
            b.Embedding("embed_tokens", vocab, hidden);
            b.ModuleList("layers", layers, i =>
            {
                using (b.Scope(i.ToString(System.Globalization.CultureInfo.InvariantCulture), P + "DecoderLayer", ModuleLocation.Other, layer: i))
                {
                    if (layerTypes[i] == "full_attention")
                        Blocks.Mla(b, P + "Attention", P + "RMSNorm", hidden, new Blocks.MlaShape(heads, qLoraRank, kvLoraRank, nope, rope, vHead, bias));
                    else
                        DeltaAttention(b, layout, hidden, q, kHeadDim, kHeads, convK);

                    if (moeSet.Contains(i))
                    {
                        using (b.Scope(ffName, P + "MoE", ModuleLocation.Other))
                        {
                            if (layout == Layout.V5) Blocks.FusedExperts(b, P + "Experts", experts, hidden, moeInter, actClass);
                            else Blocks.PerExpertMlps(b, "ModuleList", P + "MLP", experts, hidden, moeInter, actClass, "w1", "w3", "w2");
                            Blocks.TopKRouter(b, "gate", P + "TopkRouter", experts, hidden, correctionBias: true);
                            Blocks.GatedMlp(b, "shared_experts", P + "MLP", hidden, sharedInter, false, actClass, ModuleLocation.SharedExpert);
                        }
                    }
                    else
                    {
                        Blocks.GatedMlp(b, ffName, P + "MLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
                    }
                    b.RmsNorm("input_layernorm", P + "RMSNorm", hidden, ModuleLocation.Norm);
                    b.RmsNorm("post_attention_layernorm", P + "RMSNorm", hidden, ModuleLocation.Norm);
                }
            });
            b.RmsNorm("norm", P + "RMSNorm", hidden, ModuleLocation.Norm);
        }
        b.Linear("lm_head", hidden, vocab, location: ModuleLocation.LmHead, tiedWeightTo: tie ? "model.embed_tokens.weight" : null);

        var groups = c.FirstInt("num_expert_group", "n_group") ?? 1;
        var topKGroups = c.IntOrNull("topk_group", 1) ?? 1;
        var normTopK = c.Has("moe_renormalize") ? c.Bool("moe_renormalize", true) : c.Bool("norm_topk_prob", true);
        var scalingFactor = c.Double("routed_scaling_factor", 2.446);
        var routing = $"sigmoid scores + e_score_correction_bias, group-limited ({groups} groups, top {topKGroups}), top-{topK} of {experts}" +
            (normTopK ? ", renormalised" : "") + $", scaled by {scalingFactor}, plus {shared} shared expert(s)";
        var moe = moeLayers.Count == 0 ? MoeFacts.Dense(layers)
            : new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers, routing);
        var spec = Blocks.Spec(c, "kimi_linear", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        // KimiLinearModel.forward picks each layer's mask by its layer type, so a layer listed in neither list fails there.
        if (layerTypes.Take((int)layers).Any(t => t is not ("full_attention" or "linear_attention")))
            return spec with { RuntimeUnavailable = "a layer listed in neither full_attn_layers nor kda_layers (transformers cannot run it either)" };
        if (moeLayers.Count > 0 && (groups < 1 || experts % groups != 0 || topKGroups > groups))
            return spec with { RuntimeUnavailable = $"n_group {groups} / topk_group {topKGroups} that do not split {experts} experts" };

        // Pre-norm layers (KimiLinearRMSNorm, rms_norm_eps); MLA without rotary embedding (no rotary module at all), its
        // q_a / kv_a norms built without eps (1e-6), softmax scale qk_head_dim^-0.5; KDA on the "linear_attention" layers.
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-5));
        var mla = new MlaAttentionSettings(heads, qLoraRank, kvLoraRank, nope, rope, vHead, bias, RopeInterleave: false,
            Math.Pow(nope + rope, -0.5), LowRankNormEps: 1e-6, NoRope: true);
        var kda = new KimiDeltaAttentionSettings(kHeads, kHeadDim, convK, norm.Eps, act);
        var sparse = new MoeSettings(new SigmoidGroupLimitedRouterSettings("gate", experts, topK, groups, topKGroups, normTopK, scalingFactor),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
            new SharedExpertSettings("shared_experts", sharedInter, act, SigmoidGateName: null), MoeOrder.ExpertsFirst);
        var dense = new GatedMlpSettings(inter, act);
        var runtimeLayers = Enumerable.Range(0, (int)layers).Select(i => new DecoderLayerRuntime(
            layerTypes[i] == "full_attention" ? mla : kda, "mlp", moeSet.Contains(i) ? sparse : dense, norm, norm)).ToList();
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, RopeSettings.Read(c, 10000.0, rope),
                runtimeLayers, Names: new ModelNames("embed_tokens", "norm", Rotary: null)),
        };
    }

    /// <summary>layer_types, else linear_attn_config's 1-based full_attn_layers / kda_layers, else every 4th layer after 0.</summary>
    private static IReadOnlyList<string> LayerTypes(ModelConfig c, ModelConfig? linear, long layers)
    {
        var types = c.StringList("layer_types");
        if (types is null && linear?.IntList("full_attn_layers") is { } full && linear.IntList("kda_layers") is { } kda)
        {
            // Layers listed in neither stay None, which KimiLinearDecoderLayer builds as KDA.
            var t = Enumerable.Repeat("", (int)layers).ToArray();
            foreach (var l in full) t[Index(l, layers, "full_attn_layers")] = "full_attention";
            foreach (var l in kda) t[Index(l, layers, "kda_layers")] = "linear_attention";
            types = t;
        }
        types ??= Enumerable.Range(0, (int)layers).Select(i => i > 0 && i % 4 == 0 ? "full_attention" : "linear_attention").ToList();
        if (types.Count < layers)
            throw new ConfigException($"config field 'layer_types' has {types.Count} entries for {layers} layers");
        return types;
    }

    private static int Index(long oneBased, long layers, string field) =>
        oneBased >= 1 && oneBased <= layers ? (int)(oneBased - 1)
        : throw new ConfigException($"linear_attn_config.{field} holds layer {oneBased}, outside 1..{layers}");

    /// <summary>KimiLinearDeltaAttention (KDA); the depthwise convolutions are ModuleKind.Other (never all-linear).</summary>
    private static void DeltaAttention(TreeBuilder b, Layout layout, long hidden, long q, long headDim, long heads, long convK)
    {
        using (b.Scope("self_attn", P + "DeltaAttention", ModuleLocation.Attention))
        {
            b.Linear("q_proj", hidden, q);
            b.Linear("k_proj", hidden, q);
            b.Linear("v_proj", hidden, q);
            if (layout == Layout.V5)
            {
                using (b.Scope("conv1d", "Conv1d", kind: ModuleKind.Other))
                    b.Param("weight", 3 * q, 1, convK);
                using (b.Scope("forget_gate", P + "ForgetGate"))
                {
                    b.Param("dt_bias", q);
                    b.Param("A_log", 1, 1, heads, 1);
                    b.Linear("f_a_proj", hidden, headDim);
                    b.Linear("f_b_proj", headDim, q);
                }
            }
            else
            {
                b.Param("dt_bias", q);
                b.Param("A_log", 1, 1, heads, 1);
                foreach (var name in (string[])["q_conv1d", "k_conv1d", "v_conv1d"])
                {
                    using (b.Scope(name, "Conv1d", kind: ModuleKind.Other))
                        b.Param("weight", q, 1, convK);
                }
                b.Linear("f_a_proj", hidden, headDim);
                b.Linear("f_b_proj", headDim, q);
            }
            b.Linear("b_proj", hidden, heads);
            b.Linear("g_a_proj", hidden, headDim);
            b.Linear("g_b_proj", headDim, q);
            b.RmsNorm("o_norm", P + "RMSNormGated", headDim);
            b.Linear("o_proj", q, hidden);
        }
    }
}
