using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Hunyuan V4 (<c>hy_v4</c>): DeepSeek-V3.2-style attention (MLA with a DSA indexer) plus a per-head output gate
/// (<c>gate_proj</c>, H → heads·v_head_dim) and attention sinks, DeepSeek-V3's MoE block (experts without an act_fn
/// child — they clamp with <c>swiglu_limit</c> — a sigmoid TopK router whose <c>e_score_correction_bias</c> is a
/// persistent buffer, one shared-experts MLP of <c>moe_intermediate_size · n_shared_experts</c>) on the layers
/// <c>mlp_layer_types</c> marks "sparse" (default: all but layer 0), and DeepSeek-V4 hyper-connections: each layer
/// has <c>attn_hc</c> and <c>ffn_hc</c> (fn [2·hc_mult, hc_mult·H], base [2·hc_mult], scale [2]) and the model ends
/// with <c>hc_head</c> (hc_fn [hc_mult, hc_mult·H], hc_base [hc_mult], hc_scale [1]).
/// <para>
/// Only layers whose <c>indexer_types</c> entry is "full" (default: layer 0 and every 4th from layer 1) own an
/// indexer (wq_b from q_lora_rank, wk, a LayerNorm k_norm, weights_proj); "shared" layers reuse a previous top-k.
/// HYV4Config forces num_key_value_heads = num_attention_heads.
/// </para>
/// <para>
/// Runtime: <see cref="HyperConnectionSettings"/> streams around pre-norm layers of MLA (<see cref="MlaAttentionSettings"/>
/// with the indexer, sinks and output gate) and the group-limited MoE with clamped SwiGLU experts; refused for a null
/// q_lora_rank, a "shared" first layer, an index_head_dim below the rope dims or groups that do not split the experts.
/// </para>
/// <para>
/// v4 means the on-disk checkpoint layout (hy_v4 is not in transformers 4.57; module classes reuse the v5 names):
/// experts stay fused, every <c>.gate_proj</c> is saved as <c>.linear_gate</c>, <c>sinks</c> as
/// <c>learnable_sink_param</c>, the hyper-connections under <c>hc_pre.hc_attn_layer</c> / <c>hc_pre.hc_mlp_layer</c>
/// (hc_fn, hc_base, hc_scale) and <c>model.hc_pre.hc_head</c> (hc_head_fn, hc_head_base, hc_head_scale).
/// </para>
/// </summary>
internal sealed class HyV4Family : IArchitecture
{
    private const string P = "HYV4";

    public IReadOnlyList<string> ModelTypes => ["hy_v4"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: HYV4Config.
        var vocab = c.Positive("vocab_size", 120832);
        var hidden = c.Positive("hidden_size", 2816);
        var inter = c.Positive("intermediate_size", 6912);
        var moeInter = c.Positive("moe_intermediate_size", 768);
        var layers = c.Positive("num_hidden_layers", 34);
        var heads = c.Positive("num_attention_heads", 32);
        var experts = c.FirstInt("n_routed_experts", "num_local_experts") ?? 256;
        var shared = c.Int("n_shared_experts", 1);
        var topK = c.Positive("num_experts_per_tok", 8);
        var qLoraRank = c.IntOrNull("q_lora_rank", 1536);
        var kvLoraRank = c.Positive("kv_lora_rank", 512);
        var nope = c.Positive("qk_nope_head_dim", 192);
        var rope = c.Positive("qk_rope_head_dim", 64);
        var vHead = c.Positive("v_head_dim", 256);
        var indexHeadDim = c.Positive("index_head_dim", 128);
        var indexHeads = c.Positive("index_n_heads", 16);
        var hcMult = c.Positive("hc_mult", 4);
        var bias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        var mlpTypes = c.StringList("mlp_layer_types")
            ?? Enumerable.Range(0, (int)layers).Select(i => i == 0 ? "dense" : "sparse").ToList();
        var indexerTypes = c.StringList("indexer_types")
            ?? Enumerable.Range(0, (int)layers).Select(i => i == 0 || (i - 1) % 4 == 0 ? "full" : "shared").ToList();
        if (mlpTypes.Count < layers || indexerTypes.Count < layers)
            throw new ConfigException($"config fields 'mlp_layer_types' and 'indexer_types' need {layers} entries");
        if (qLoraRank is null && indexerTypes.Take((int)layers).Any(t => t != "shared"))
            throw new ConfigException("hy_v4 indexer layers need 'q_lora_rank' (HYV4Indexer projects from the query latent)");

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers, i => mlpTypes[i] == "sparse");
        var moeSet = moeLayers.ToHashSet();
        var sharedInter = moeInter * shared;
        var v5 = layout == Layout.V5;
        // save_pretrained writes every ".gate_proj" as ".linear_gate" (the reverse of HYV4's WeightRenaming).
        var gateName = v5 ? "gate_proj" : "linear_gate";

        var b = new TreeBuilder(P + "ForCausalLM", layout);
        using (b.Scope("model", P + "Model"))
        {
            b.Embedding("embed_tokens", vocab, hidden);
            b.ModuleList("layers", layers, i =>
            {
                using (b.Scope(i.ToString(System.Globalization.CultureInfo.InvariantCulture), P + "DecoderLayer", ModuleLocation.Other, layer: i))
                {
                    Attention(b, v5, gateName, hidden, heads, qLoraRank, kvLoraRank, nope, rope, vHead, bias,
                        indexerTypes[i] != "shared", indexHeads, indexHeadDim);
                    if (moeSet.Contains(i))
                    {
                        using (b.Scope("mlp", P + "MoE", ModuleLocation.Other))
                        {
                            using (b.Scope("experts", P + "Experts", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts, numExperts: experts))
                            {
                                b.Param("gate_up_proj", experts, 2 * moeInter, hidden);
                                b.Param("down_proj", experts, hidden, moeInter);
                            }
                            Blocks.TopKRouter(b, "gate", P + "TopkRouter", experts, hidden);
                            Mlp(b, "shared_experts", gateName, hidden, sharedInter, actClass, ModuleLocation.SharedExpert);
                        }
                    }
                    else
                    {
                        Mlp(b, "mlp", gateName, hidden, inter, actClass, ModuleLocation.Mlp);
                    }
                    b.RmsNorm("input_layernorm", P + "RMSNorm", hidden, ModuleLocation.Norm);
                    b.RmsNorm("post_attention_layernorm", P + "RMSNorm", hidden, ModuleLocation.Norm);
                    if (v5)
                    {
                        HyperConnection(b, "attn_hc", "", hcMult, hidden);
                        HyperConnection(b, "ffn_hc", "", hcMult, hidden);
                    }
                    else
                    {
                        using (b.Scope("hc_pre", "Module"))
                        {
                            HyperConnection(b, "hc_attn_layer", "hc_", hcMult, hidden);
                            HyperConnection(b, "hc_mlp_layer", "hc_", hcMult, hidden);
                        }
                    }
                }
            });
            b.RmsNorm("norm", P + "RMSNorm", hidden, ModuleLocation.Norm);
            b.Leaf("rotary_emb", P + "RotaryEmbedding");
            if (v5)
            {
                HyperHead(b, "hc_head", "hc_", hcMult, hidden);
            }
            else
            {
                using (b.Scope("hc_pre", "Module"))
                    HyperHead(b, "hc_head", "hc_head_", hcMult, hidden);
            }
        }
        b.Linear("lm_head", hidden, vocab, location: ModuleLocation.LmHead, tiedWeightTo: tie ? "model.embed_tokens.weight" : null);

        var routing = $"sigmoid scores + e_score_correction_bias, group-limited ({c.Int("n_group", 1)} groups, top " +
            $"{c.Int("topk_group", 1)}), top-{topK} of {experts}" + (c.Bool("norm_topk_prob", true) ? ", renormalised" : "") +
            $", scaled by {c.Double("routed_scaling_factor", 2.827)}, plus {shared} shared expert(s)";
        var moe = moeLayers.Count == 0 ? MoeFacts.Dense(layers)
            : new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers, routing);
        var spec = Blocks.Spec(c, "hy_v4", b.Build(), moe, hidden, layers, vocab, heads, heads, tie, act);

        // HYV4Attention.forward runs q_a_proj whatever q_lora_rank says, and a "shared" layer needs an earlier indexer.
        if (qLoraRank is null)
            return spec with { RuntimeUnavailable = "a null q_lora_rank (HYV4Attention always projects through q_a_proj)" };
        if (indexerTypes[0] == "shared")
            return spec with { RuntimeUnavailable = "a first layer whose indexer_types entry is \"shared\" (no earlier indexer to reuse)" };
        if (indexHeadDim < rope)
            return spec with { RuntimeUnavailable = $"an index_head_dim ({indexHeadDim}) below qk_rope_head_dim ({rope})" };
        var groups = c.Int("n_group", 1);
        var topKGroups = c.Int("topk_group", 1);
        if (groups <= 0 || experts % groups != 0 || topKGroups > groups)
            return spec with { RuntimeUnavailable = $"n_group {groups} / topk_group {topKGroups} that do not split {experts} experts" };
        return spec with
        {
            Runtime = Runtime(c, vocab, hidden, tie, heads, qLoraRank.Value, kvLoraRank, nope, rope, vHead, bias, indexHeads, indexHeadDim,
                hcMult, act, inter, moeInter, sharedInter, experts, topK, groups, topKGroups, mlpTypes, indexerTypes, layers),
        };
    }

    /// <summary>
    /// What HYV4ForCausalLM computes: DeepSeek-V3.2's MLA (rotating halves, not interleaved) with the indexer on "full"
    /// layers, the per-element sigmoid output gate and sinks (eager attention, the only one HY-V4 supports); DeepSeek-V3's
    /// sigmoid group-limited MoE with clamped SwiGLU experts; hyper-connections around both sublayers.
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig c, long vocab, long hidden, bool tie, long heads, long qLoraRank, long kvLoraRank,
        long nope, long rope, long vHead, bool bias, long indexHeads, long indexHeadDim, long hcMult, string act, long inter, long moeInter,
        long sharedInter, long experts, long topK, long groups, long topKGroups, IReadOnlyList<string> mlpTypes,
        IReadOnlyList<string> indexerTypes, long layers)
    {
        var eps = c.Double("rms_norm_eps", 1e-5);
        var norm = new NormSettings(NormKind.Rms, eps);
        // HYV4RotaryEmbedding rotates head_dim, which HYV4Config sets to qk_rope_head_dim.
        var ropeSettings = RopeSettings.Read(c, 10000.0, rope);
        // q_a_layernorm / kv_a_layernorm are built without eps (the RMSNorm's 1e-6); the indexer's k_norm uses rms_norm_eps.
        var attention = new MlaAttentionSettings(heads, qLoraRank, kvLoraRank, nope, rope, vHead, bias, RopeInterleave: false,
            ropeSettings.MlaSoftmaxScale(nope + rope), LowRankNormEps: 1e-6,
            Indexer: new DsaIndexerSettings(indexHeads, indexHeadDim, c.Positive("index_topk", 2048), InterleavedRope: false, RopeOnLast: true, KNormEps: eps,
                KeepInFp32: true),
            Sinks: true, Gate: new OutputGate("gate_proj", OutputGateKind.Sigmoid, PerHead: false));
        var sharedTopK = attention with { Indexer = null, ReusesTopK = true };
        // HYV4Experts: silu(clamp(gate, max = L)) · clamp(up, ±L), no act_fn child.
        var sparse = new MoeSettings(
            new SigmoidGroupLimitedRouterSettings("gate", experts, topK, groups, topKGroups, c.Bool("norm_topk_prob", true),
                c.Double("routed_scaling_factor", 2.827)),
            new ExpertsSettings(ExpertsLayout.GateUpOutInClamped, experts, moeInter, act, SwigluLimit: c.Double("swiglu_limit", 10.0),
                SwigluAlpha: 1.0, SwigluUpShift: 0.0),
            new SharedExpertSettings("shared_experts", sharedInter, act, SigmoidGateName: null), MoeOrder.ExpertsFirst);
        var dense = new GatedMlpSettings(inter, act);
        var runtimeLayers = Enumerable.Range(0, (int)layers)
            .Select(i => new DecoderLayerRuntime(indexerTypes[i] == "shared" ? sharedTopK : attention, "mlp",
                mlpTypes[i] == "sparse" ? sparse : dense, norm, norm)).ToList();
        var hc = new HyperConnectionSettings(hcMult, c.Double("hc_eps", 1e-6), eps, c.Double("hc_magnitude", 2.0));
        return new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.006), norm, ropeSettings, runtimeLayers,
            HyperConnections: hc);
    }

    /// <summary>HYV4Attention: MLA, the optional DSA indexer, the output gate and the per-head sinks.</summary>
    private static void Attention(TreeBuilder b, bool v5, string gateName, long hidden, long heads, long? qLoraRank,
        long kvLoraRank, long nope, long rope, long vHead, bool bias, bool indexer, long indexHeads, long indexHeadDim)
    {
        using (b.Scope("self_attn", P + "Attention", ModuleLocation.Attention))
        {
            if (qLoraRank is null)
            {
                b.Linear("q_proj", hidden, heads * (nope + rope));
            }
            else
            {
                b.Linear("q_a_proj", hidden, qLoraRank.Value, bias);
                b.RmsNorm("q_a_layernorm", P + "RMSNorm", qLoraRank.Value);
                b.Linear("q_b_proj", qLoraRank.Value, heads * (nope + rope));
            }
            b.Linear("kv_a_proj_with_mqa", hidden, kvLoraRank + rope, bias);
            b.RmsNorm("kv_a_layernorm", P + "RMSNorm", kvLoraRank);
            b.Linear("kv_b_proj", kvLoraRank, heads * (nope + vHead));
            b.Linear("o_proj", heads * vHead, hidden, bias);
            if (indexer)
            {
                using (b.Scope("indexer", P + "Indexer"))
                {
                    b.Linear("wq_b", qLoraRank!.Value, indexHeads * indexHeadDim);
                    b.Linear("wk", hidden, indexHeadDim);
                    b.LayerNorm("k_norm", indexHeadDim);
                    b.Linear("weights_proj", hidden, indexHeads);
                }
            }
            b.Linear(gateName, hidden, heads * vHead);
            b.Param(v5 ? "sinks" : "learnable_sink_param", heads);
        }
    }

    /// <summary>HYV4MLP: gate_proj (saved as linear_gate), up_proj, down_proj, act_fn.</summary>
    private static void Mlp(TreeBuilder b, string name, string gateName, long hidden, long inter, string actClass, ModuleLocation location)
    {
        using (b.Scope(name, P + "MLP", location))
        {
            b.Linear(gateName, hidden, inter);
            b.Linear("up_proj", hidden, inter);
            b.Linear("down_proj", inter, hidden);
            b.Leaf("act_fn", actClass);
        }
    }

    /// <summary>HYV4HyperConnection: fn, base, scale (own parameters) and a parameter-less input_norm.</summary>
    private static void HyperConnection(TreeBuilder b, string name, string paramPrefix, long hcMult, long hidden)
    {
        using (b.Scope(name, P + "HyperConnection", kind: ModuleKind.Other))
        {
            b.Param(paramPrefix + "fn", 2 * hcMult, hcMult * hidden);
            b.Param(paramPrefix + "base", 2 * hcMult);
            b.Param(paramPrefix + "scale", 2);
            b.Leaf("input_norm", P + "UnweightedRMSNorm");
        }
    }

    /// <summary>HYV4HyperHead: hc_fn, hc_base, hc_scale and a parameter-less input_norm.</summary>
    private static void HyperHead(TreeBuilder b, string name, string paramPrefix, long hcMult, long hidden)
    {
        using (b.Scope(name, P + "HyperHead", ModuleLocation.Norm, kind: ModuleKind.Other))
        {
            b.Param(paramPrefix + "fn", hcMult, hcMult * hidden);
            b.Param(paramPrefix + "base", hcMult);
            b.Param(paramPrefix + "scale", 1);
            b.Leaf("input_norm", P + "UnweightedRMSNorm");
        }
    }
}
