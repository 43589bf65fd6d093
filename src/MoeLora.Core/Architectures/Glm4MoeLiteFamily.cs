using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// GLM-4.7-Flash (<c>glm4_moe_lite</c>) and the two models transformers derives from it: DeepSeek-V3.2
/// (<c>deepseek_v32</c>) and GLM-5 (<c>glm_moe_dsa</c>). All three are DeepSeek-V3 underneath: MLA attention, a
/// sigmoid TopK router with the persistent <c>e_score_correction_bias</c> buffer, <c>n_shared_experts</c> shared experts
/// fused into one MLP of <c>moe_intermediate_size * n_shared_experts</c>, dense or MoE per <c>mlp_layer_types</c>.
/// The two sparse-attention types add the DSA lightning indexer to the attention; GLM-5 only on layers whose
/// <c>indexer_types</c> entry is "full" ("shared" layers reuse the previous layer's selection).
/// None of the three existed in transformers 4.57: <see cref="Layout.V4"/> here means the on-disk checkpoint layout,
/// per-expert <c>experts.{e}.gate_proj/up_proj/down_proj</c> (a ModuleList of the type's MLP class).
/// Runtime: glm4_moe_lite only, checked against a transformers fixture (tests' Data/hf-moe/glm4_moe_lite). Read from transformers 5.17's modeling_glm4_moe_lite.py, it is DeepSeek-V3's runtime:
/// Glm4MoeLiteAttention (MLA, <c>apply_rotary_pos_emb_interleave</c> under rope_interleave, scaling from
/// <c>yarn_apply_mscale</c>), Glm4MoeLiteTopkRouter (fp32 sigmoid, group-limited on scores + e_score_correction_bias,
/// groups scored by their best two), shared experts always added, dense or sparse per mlp_layer_types. What differs from
/// V3 is read here: the rope width (head_dim = qk_rope_head_dim times partial_rotary_factor), the rms_norm_eps default.
/// The two DSA types run the same blocks plus the DSA lightning indexer (<see cref="DsaIndexerSettings"/>), which
/// restricts each query to its top index_topk keys; GLM-5's fixture (Data/hf-moe/glm_moe_dsa) matches transformers, but
/// its index_topk keeps every key, so the selection itself is checked by unit tests only; deepseek_v32 has no fixture.
/// </summary>
internal sealed class Glm4MoeLiteFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["glm4_moe_lite", "deepseek_v32", "glm_moe_dsa"];

    /// <summary>Each config class's defaults for the fields that shape the tree.</summary>
    private sealed record Defaults(string Prefix, long Vocab, long Hidden, long Inter, long MoeInter, long Layers, long Heads,
        long Experts, long TopK, double Scale, long QLoraRank, long Rope, long VHead, long Nope, long Groups, long TopkGroup,
        long FirstDense, long IndexHeads);

    private static readonly Dictionary<string, Defaults> ByType = new(StringComparer.Ordinal)
    {
        ["glm4_moe_lite"] = new("Glm4MoeLite", 154880, 2048, 10240, 1536, 47, 20, 64, 4, 1.8, 768, 64, 256, 192, 1, 1, 1, 0),
        ["deepseek_v32"] = new("DeepseekV32", 129280, 7168, 18432, 2048, 61, 128, 256, 8, 2.5, 1536, 64, 128, 128, 8, 4, 3, 64),
        ["glm_moe_dsa"] = new("GlmMoeDsa", 154880, 6144, 12288, 2048, 78, 64, 256, 8, 2.5, 2048, 64, 256, 192, 1, 1, 3, 32),
    };

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var type = c.ModelType!;
        var d = ByType[type];
        var p = d.Prefix;
        var dsa = type != "glm4_moe_lite";
        var vocab = c.Positive("vocab_size", d.Vocab);
        var hidden = c.Positive("hidden_size", d.Hidden);
        var inter = c.Positive("intermediate_size", d.Inter);
        var moeInter = c.Positive("moe_intermediate_size", d.MoeInter);
        var layers = c.Positive("num_hidden_layers", d.Layers);
        var heads = c.Positive("num_attention_heads", d.Heads);
        var kv = c.IntOrNull("num_key_value_heads", heads) ?? heads;
        // The sparse-attention configs re-route a legacy num_experts onto n_routed_experts; num_local_experts is an alias.
        var experts = (dsa ? c.FirstInt("num_experts", "n_routed_experts", "num_local_experts") : c.FirstInt("n_routed_experts", "num_local_experts"))
            ?? d.Experts;
        var shared = c.Int("n_shared_experts", 1);
        var topK = c.Positive("num_experts_per_tok", d.TopK);
        // Glm4MoeLiteConfig maps head_dim onto qk_rope_head_dim (attribute_map); the DSA configs overwrite head_dim instead.
        var mla = Blocks.MlaShape.Read(c, heads, d.QLoraRank, 512, d.Nope, d.Rope, d.VHead);
        if (!dsa && c.FirstInt("head_dim") is { } rope) mla = mla with { RopeDim = rope, QkHeadDim = mla.NopeDim + rope };
        var indexHeads = dsa ? c.Positive("index_n_heads", d.IndexHeads) : 0;
        var indexHeadDim = dsa ? c.Positive("index_head_dim", 128) : 0;
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var sharedInter = moeInter * shared;

        // lite: dense first layer, then sparse; the DSA configs: first_k_dense_replace dense layers.
        var firstDense = dsa ? Math.Min(c.Int("first_k_dense_replace", d.FirstDense), layers) : 1;
        var (moeLayers, denseLayers) = Blocks.SplitByMlpLayerTypes(c, layers, i => i >= firstDense);
        var moeSet = moeLayers.ToHashSet();
        var fullIndexer = type == "glm_moe_dsa" ? IndexerTypes(c, layers) : null;

        var b = new TreeBuilder(p + "ForCausalLM", layout);
        Blocks.CausalLm(b, p, vocab, hidden, layers, tie, i =>
        {
            Blocks.Mla(b, p + "Attention", p + "RMSNorm", hidden, mla, after: dsa && (fullIndexer is null || fullIndexer[i])
                ? bb => Blocks.DsaIndexer(bb, p + "Indexer", hidden, mla.QLoraRank, indexHeads, indexHeadDim)
                : null);
            if (moeSet.Contains(i))
                Blocks.SharedExpertMoe(b, layout, p, p + "MoE", experts, hidden, moeInter, sharedInter, actClass, Blocks.ScoreBias.OnRouter);
            else
                Blocks.GatedMlp(b, "mlp", p + "MLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
            b.RmsNorm("input_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
        });

        var groups = c.Int("n_group", d.Groups);
        var topKGroups = c.Int("topk_group", d.TopkGroup);
        var normTopK = c.Bool("norm_topk_prob", true);
        var scale = c.Double("routed_scaling_factor", d.Scale);
        var routing = Blocks.GroupedTopKRouting("sigmoid", true, groups, topKGroups, topK, experts, normTopK, scale);
        var moe = new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers, routing);
        var spec = Blocks.Spec(c, type, b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        // Glm4MoeLiteRotaryEmbedding rotates head_dim (= qk_rope_head_dim) · partial_rotary_factor dims; any other
        // width than the rope dims makes transformers' forward fail, so the runtime refuses it. The DSA configs set
        // head_dim = qk_rope_head_dim and their rotary embedding reads no partial factor.
        var ropeDim = dsa ? mla.RopeDim : (long)(mla.RopeDim * RopeSettings.PartialRotaryFactor(c, 1.0));
        if (ropeDim != mla.RopeDim)
            return spec with { RuntimeUnavailable = $"a rotary width ({ropeDim}) other than qk_rope_head_dim ({mla.RopeDim})" };
        if (dsa && indexHeadDim < mla.RopeDim)
            return spec with { RuntimeUnavailable = $"an index_head_dim ({indexHeadDim}) below qk_rope_head_dim ({mla.RopeDim})" };
        // A "shared" GLM-5 layer reuses the previous full layer's selection; transformers raises without one.
        if (fullIndexer is { Length: > 0 } && !fullIndexer[0])
            return spec with { RuntimeUnavailable = "a first layer whose indexer_types entry is \"shared\" (no earlier indexer to reuse)" };
        if (experts % groups != 0 || topKGroups > groups)
            return spec with { RuntimeUnavailable = $"n_group {groups} / topk_group {topKGroups} that do not split {experts} experts" };
        var ropeSettings = RopeSettings.Read(c, 10000.0, ropeDim);
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", type == "deepseek_v32" ? 1e-6 : 1e-5));
        // q_a_layernorm and kv_a_layernorm are built without eps: the RMSNorm's 1e-6. The DSA attentions always use
        // apply_rotary_pos_emb_interleave; their indexer rotates halves (DeepseekV32Indexer) or interleaved pairs
        // (GlmMoeDsaIndexer).
        var attention = new MlaAttentionSettings(heads, mla.QLoraRank, mla.KvLoraRank, mla.NopeDim, mla.RopeDim, mla.VHeadDim, mla.Bias,
            dsa || c.Bool("rope_interleave", true), ropeSettings.MlaSoftmaxScale(mla.QkHeadDim), LowRankNormEps: 1e-6,
            Indexer: dsa ? new DsaIndexerSettings(indexHeads, indexHeadDim, c.Positive("index_topk", 2048), InterleavedRope: type == "glm_moe_dsa") : null);
        // GLM-5's "shared" layers: no indexer, the previous layer's top-k.
        var sharedTopK = attention with { Indexer = null, ReusesTopK = true };
        var sparse = new MoeSettings(
            new SigmoidGroupLimitedRouterSettings("gate", experts, topK, groups, topKGroups, normTopK, scale),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
            new SharedExpertSettings("shared_experts", sharedInter, act, SigmoidGateName: null), MoeOrder.ExpertsFirst);
        var dense = new GatedMlpSettings(inter, act);
        var runtimeLayers = Enumerable.Range(0, (int)layers)
            .Select(i => new DecoderLayerRuntime(fullIndexer is null || fullIndexer[i] ? attention : sharedTopK, "mlp",
                moeSet.Contains(i) ? sparse : dense, norm, norm)).ToList();
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, ropeSettings, runtimeLayers),
        };
    }

    /// <summary>
    /// GlmMoeDsaConfig's indexer_types: given, else from index_topk_pattern ("F"/"S" per layer), else full every
    /// index_topk_freq layers counted from index_skip_topk_offset (defaults 1 and 2: every layer full).
    /// </summary>
    private static bool[] IndexerTypes(ModelConfig c, long layers)
    {
        var types = c.StringList("indexer_types")
            ?? (c.Json["index_topk_pattern"] is System.Text.Json.Nodes.JsonValue pv && pv.TryGetValue<string>(out var pattern)
                ? pattern.Select(ch => ch switch
                {
                    'F' => "full",
                    'S' => "shared",
                    _ => throw new ConfigException($"config field 'index_topk_pattern' may hold only F and S, got '{ch}'"),
                }).ToList()
                : c.StringList("index_topk_pattern"));
        if (types is null)
        {
            var freq = Math.Max(c.Int("index_topk_freq", 1), 1);
            var offset = c.Int("index_skip_topk_offset", 2);
            return Enumerable.Range(0, (int)layers).Select(i => Math.Max(i - offset + 1, 0) % freq == 0).ToArray();
        }
        if (types.Count < layers)
            throw new ConfigException($"config field 'indexer_types' has {types.Count} entries for {layers} layers");
        return types.Take((int)layers).Select(t => t == "full").ToArray();
    }
}
