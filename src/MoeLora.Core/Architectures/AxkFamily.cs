using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// SK Telecom's A.X-K1 (<c>axk1</c>) and A.X-K2 (<c>axk2</c>), both DeepSeek-V3 derivatives new in transformers 5:
/// Layout.V4 means the on-disk checkpoint layout (v5 module classes, experts as a per-expert ModuleList of
/// gate_proj/up_proj/down_proj, plus each type's renames below). MLA attention; MoE blocks register experts, the
/// TopK router (sigmoid scores, persistent <c>e_score_correction_bias</c> buffer) and a shared MLP of
/// <c>moe_intermediate_size · n_shared_experts</c>; dense layers use an MLP of <c>intermediate_size</c>.
/// <list type="bullet">
/// <item>A.X-K1: the first <c>first_k_dense_replace</c> layers dense; the MoE block ends in
/// <c>post_mlp_layernorm</c>, stored at the decoder-layer level on disk.</item>
/// <item>A.X-K2: <c>mlp_layer_types</c> (default from the init-only <c>first_k_dense_replace</c> = 1 and
/// <c>moe_layer_freq</c> = 1); the query LoRA is required and its up-projection is q_gate_proj
/// [heads·(qk_head + v_head), 2·q_lora_rank] (query and output gate; <c>q_b_proj</c> on disk); every attention has a
/// DeepSeek sparse-attention indexer (wq_b, wk, a LayerNorm k_norm, weights_proj); input_layernorm, and
/// post_attention_layernorm of MoE layers, are gated RMSNorms (norm, then a low-rank gate MLP fc1/fc2 of
/// <c>gated_norm_rank</c>, stored as W_down/W_up).</item>
/// </list>
/// Runtime: both types, checked against transformers fixtures (tests' Data/hf-moe/axk1, axk2). A.X-K1 is DeepSeek-V3's
/// runtime with the block's output norm; A.X-K2 adds the gated query (q_gate_proj, output times sigmoid(gate)), the
/// DSA indexer's top-k key selection (the fixture's index_topk keeps every key; the selection itself is unit-tested),
/// the gated RMSNorms, and its router (no groups by default; with groups, the others score 0, not -inf).
/// </summary>
internal sealed class AxkFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["axk1", "axk2"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var type = c.ModelType!;
        var k2 = type == "axk2";
        var p = k2 ? "AXK2" : "AXK1";
        var v5 = layout == Layout.V5;
        // Defaults: AXK1Config / AXK2Config.
        var vocab = c.Positive("vocab_size", 163840);
        var hidden = c.Positive("hidden_size", k2 ? 2048 : 7168);
        var inter = c.Positive("intermediate_size", k2 ? 5120 : 18432);
        var moeInter = c.Positive("moe_intermediate_size", k2 ? 512 : 2048);
        var layers = c.Positive("num_hidden_layers", k2 ? 48 : 61);
        var heads = c.Positive("num_attention_heads", k2 ? 32 : 64);
        var kv = c.IntOrNull("num_key_value_heads", k2 ? 32 : 64) ?? heads;
        var experts = c.FirstInt("n_routed_experts", "num_local_experts") ?? (k2 ? 128 : 192);
        var shared = c.Int("n_shared_experts", 1);
        var topK = c.Positive("num_experts_per_tok", 8);
        var qLoraRank = c.IntOrNull("q_lora_rank", k2 ? 384 : 1536);
        if (k2 && qLoraRank is not > 0)
            throw new ConfigException($"config field 'q_lora_rank' must be a positive integer for axk2 (the indexer and output gate read it), got {qLoraRank?.ToString(System.Globalization.CultureInfo.InvariantCulture) ?? "null"}");
        var kvLoraRank = c.Positive("kv_lora_rank", k2 ? 128 : 512);
        var rope = c.Positive("qk_rope_head_dim", k2 ? 32 : 64);
        var nope = c.Positive("qk_nope_head_dim", k2 ? 64 : 128);
        var vHead = c.Positive("v_head_dim", k2 ? 64 : 128);
        var attnBias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var sharedInter = moeInter * shared;
        // AXK2Indexer (DeepseekV32Indexer): A.X-K2 only.
        var indexHeads = k2 ? c.Positive("index_n_heads", 16) : 0;
        var indexHeadDim = k2 ? c.Positive("index_head_dim", 128) : 0;

        var firstDense = c.Int("first_k_dense_replace", 1);
        var freq = c.Int("moe_layer_freq", 1);
        var (moeLayers, denseLayers) = k2
            ? Blocks.SplitByMlpLayerTypes(c, layers, i => i >= firstDense && freq > 0 && i % freq == 0)
            : Blocks.SplitLayers(layers, i => i >= firstDense);
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder(p + "ForCausalLM", layout);
        Blocks.CausalLm(b, p, vocab, hidden, layers, tie, i =>
        {
            using (b.Scope("self_attn", p + "Attention", ModuleLocation.Attention))
            {
                Blocks.MlaProjections(b, p + "RMSNorm", hidden, new Blocks.MlaShape(heads, qLoraRank, kvLoraRank, nope, rope, vHead, attnBias), k2
                    ? () => b.Linear(v5 ? "q_gate_proj" : "q_b_proj", 2 * qLoraRank!.Value, heads * (nope + rope + vHead))
                    : null);
                if (k2) Blocks.DsaIndexer(b, "AXK2Indexer", hidden, qLoraRank, indexHeads, indexHeadDim);
            }
            var moeLayer = moeSet.Contains(i);
            if (moeLayer)
            {
                using (b.Scope("mlp", p + "MoE", ModuleLocation.Other))
                {
                    Blocks.Experts(b, layout, p, experts, hidden, moeInter, actClass, Blocks.ExpertNames.Proj);
                    Blocks.TopKRouter(b, "gate", p + "TopkRouter", experts, hidden);
                    Blocks.GatedMlp(b, "shared_experts", p + "MLP", hidden, sharedInter, false, actClass, ModuleLocation.SharedExpert);
                    if (!k2 && v5) b.RmsNorm("post_mlp_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
                }
            }
            else
            {
                Blocks.GatedMlp(b, "mlp", p + "MLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
            }
            if (k2)
            {
                GatedNorm(b, "input_layernorm", c, hidden, v5);
                if (moeLayer) GatedNorm(b, "post_attention_layernorm", c, hidden, v5);
                else b.RmsNorm("post_attention_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
            }
            else
            {
                b.RmsNorm("input_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
                b.RmsNorm("post_attention_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
                // On disk A.X-K1 keeps the MoE output norm at the layer level.
                if (moeLayer && !v5) b.RmsNorm("post_mlp_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
            }
        });

        var group = c.IntOrNull("n_group", k2 ? null : 8);
        var routing = $"sigmoid scores + e_score_correction_bias, " +
            (group is null ? "" : $"group-limited ({group} groups, top {c.IntOrNull("topk_group", k2 ? null : 4)}), ") +
            $"top-{topK} of {experts}" + (c.Bool("norm_topk_prob", true) ? " renormalised" : "") +
            $", scaled by {c.Double("routed_scaling_factor", 2.5)}, plus {shared} shared expert(s)" +
            (k2 ? "" : "; the block's output passes post_mlp_layernorm");
        var moe = new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers, routing);
        var spec = Blocks.Spec(c, type, b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        // Runtime: DeepSeek-V3's pieces (MLA with rope_interleave, yarn_apply_mscale scaling, the sigmoid grouped router,
        // fused experts then shared experts) plus each type's delta, read from transformers 5.17's modeling_axk1/2.py.
        var mla = new Blocks.MlaShape(heads, qLoraRank, kvLoraRank, nope, rope, vHead, attnBias);
        var topKGroups = c.IntOrNull("topk_group", k2 ? null : 4);
        if (k2 && (group is null) != (topKGroups is null))
            return spec with { RuntimeUnavailable = "A.X-K2 with only one of n_group and topk_group (AXK2Config rejects it)" };
        long groups = group ?? 1, keptGroups = topKGroups ?? 1;
        if (groups <= 0 || experts % groups != 0 || keptGroups <= 0 || keptGroups > groups)
            return spec with { RuntimeUnavailable = $"n_group {groups} / topk_group {keptGroups} that do not split {experts} experts" };
        var ropeSettings = RopeSettings.Read(c, 10000.0, rope);
        var eps = c.Double("rms_norm_eps", 1e-6);
        var norm = new NormSettings(NormKind.Rms, eps);
        DsaIndexerSettings? indexer = null;
        if (k2)
        {
            indexer = new DsaIndexerSettings(indexHeads, indexHeadDim, c.Positive("index_topk", 2048), InterleavedRope: false);
            if (indexer.HeadDim < rope)
                return spec with { RuntimeUnavailable = $"an index_head_dim ({indexer.HeadDim}) below qk_rope_head_dim ({rope})" };
        }
        // q_a_layernorm / kv_a_layernorm are built without eps: the RMSNorm's 1e-6. AXK1Attention is DeepseekV3Attention
        // (rope_interleave, default true); AXK2Attention always uses apply_rotary_pos_emb_interleave.
        var attention = new MlaAttentionSettings(heads, qLoraRank, kvLoraRank, nope, rope, vHead, attnBias,
            k2 || c.Bool("rope_interleave", true), ropeSettings.MlaSoftmaxScale(mla.QkHeadDim), LowRankNormEps: 1e-6,
            QueryGate: k2, Indexer: indexer);
        // AXK2TopkRouter.apply_group_scoring fills the other groups with 0.0, DeepseekV3TopkRouter (A.X-K1) with -inf.
        var router = new SigmoidGroupLimitedRouterSettings("gate", experts, topK, groups, keptGroups, c.Bool("norm_topk_prob", true),
            c.Double("routed_scaling_factor", 2.5), k2 ? 0.0 : double.NegativeInfinity);
        // AXK1MoE: the routed plus shared output passes post_mlp_layernorm.
        var sparse = new MoeSettings(router, new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
            new SharedExpertSettings("shared_experts", sharedInter, act, SigmoidGateName: null), MoeOrder.ExpertsFirst,
            k2 ? null : new MoeOptions(OutputNorm: new NamedNorm("post_mlp_layernorm", norm)));
        var dense = new GatedMlpSettings(inter, act);
        // AXK2DecoderLayer: input_layernorm always gated, post_attention_layernorm gated on MoE layers only.
        var gated = new NormSettings(NormKind.GatedRms, eps, c.Positive("gated_norm_rank", 16));
        var runtimeLayers = Enumerable.Range(0, (int)layers).Select(i =>
        {
            var moeLayer = moeSet.Contains(i);
            return new DecoderLayerRuntime(attention, "mlp", moeLayer ? sparse : dense, k2 ? gated : norm, k2 && moeLayer ? gated : norm);
        }).ToList();
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, ropeSettings, runtimeLayers),
        };
    }

    /// <summary>AXK2GatedRMSNorm: RMSNorm, then y · sigmoid(fc2(SiLU(fc1(y)))); on disk fc1/fc2 are W_down/W_up.</summary>
    private static void GatedNorm(TreeBuilder b, string name, ModelConfig c, long hidden, bool v5)
    {
        var rank = c.Positive("gated_norm_rank", 16);
        using (b.Scope(name, "AXK2GatedRMSNorm", ModuleLocation.Norm))
        {
            b.RmsNorm("norm", "AXK2RMSNorm", hidden);
            if (v5)
            {
                using (b.Scope("mlp", "AXK2GateMLP"))
                {
                    b.Leaf("activation_fn", "SiLU");
                    b.Linear("fc1", hidden, rank);
                    b.Linear("fc2", rank, hidden);
                }
            }
            else
            {
                b.Linear("W_down", hidden, rank);
                b.Linear("W_up", rank, hidden);
            }
        }
    }
}
