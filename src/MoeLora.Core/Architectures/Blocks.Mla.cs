using System.Globalization;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// The DeepSeek-V3 lineage's shared pieces: multi-head latent attention (MLA), the DSA lightning indexer, and the
/// MoE block of routed experts, a grouped TopK router and fused shared experts.
/// </summary>
internal static partial class Blocks
{
    /// <summary>MLA projection shapes. <paramref name="QLoraRank"/> null: one q_proj instead of the q_a/q_b pair.</summary>
    public sealed record MlaShape(long Heads, long? QLoraRank, long KvLoraRank, long NopeDim, long RopeDim, long VHeadDim,
        bool Bias)
    {
        /// <summary>The per-head query/key width, nope + rope (LongCat lets the config override it).</summary>
        public long QkHeadDim { get; init; } = NopeDim + RopeDim;

        /// <summary>Reads the DeepSeek field names; the defaults are the calling config class's.</summary>
        public static MlaShape Read(ModelConfig c, long heads, long? qLoraRank, long kvLoraRank, long nope, long rope, long vHead) =>
            new(heads, c.IntOrNull("q_lora_rank", qLoraRank), c.Positive("kv_lora_rank", kvLoraRank),
                c.Positive("qk_nope_head_dim", nope), c.Positive("qk_rope_head_dim", rope), c.Positive("v_head_dim", vHead),
                c.Bool("attention_bias", false));
    }

    /// <summary>
    /// MLA's projections in registration order: q_proj (or q_a_proj, q_a_layernorm, q_b_proj), kv_a_proj_with_mqa,
    /// kv_a_layernorm, kv_b_proj, o_proj. attention_bias reaches q_a, kv_a and o only. <paramref name="queryUp"/> replaces
    /// q_b_proj (A.X-K2's gated query up-projection).
    /// </summary>
    public static void MlaProjections(TreeBuilder b, string normClass, long hidden, MlaShape m, Action? queryUp = null)
    {
        if (m.QLoraRank is not { } qRank)
        {
            b.Linear("q_proj", hidden, m.Heads * m.QkHeadDim);
        }
        else
        {
            b.Linear("q_a_proj", hidden, qRank, m.Bias);
            b.RmsNorm("q_a_layernorm", normClass, qRank);
            if (queryUp is null) b.Linear("q_b_proj", qRank, m.Heads * m.QkHeadDim);
            else queryUp();
        }
        b.Linear("kv_a_proj_with_mqa", hidden, m.KvLoraRank + m.RopeDim, m.Bias);
        b.RmsNorm("kv_a_layernorm", normClass, m.KvLoraRank);
        b.Linear("kv_b_proj", m.KvLoraRank, m.Heads * (m.NopeDim + m.VHeadDim));
        b.Linear("o_proj", m.Heads * m.VHeadDim, hidden, m.Bias);
    }

    /// <summary>An MLA attention module named <paramref name="name"/>; <paramref name="after"/> adds modules after o_proj.</summary>
    public static void Mla(TreeBuilder b, string className, string normClass, long hidden, MlaShape m,
        Action<TreeBuilder>? after = null, string name = "self_attn")
    {
        using (b.Scope(name, className, ModuleLocation.Attention))
        {
            MlaProjections(b, normClass, hidden, m);
            after?.Invoke(b);
        }
    }

    /// <summary>
    /// The DeepSeek sparse attention (DSA) lightning indexer: wq_b (from the q LoRA latent), wk, a LayerNorm with bias
    /// on the key, weights_proj (one weight per indexer head). It reads q_lora_rank, so it cannot exist without it.
    /// </summary>
    public static void DsaIndexer(TreeBuilder b, string className, long hidden, long? qLoraRank, long heads, long headDim)
    {
        if (qLoraRank is not { } qRank)
            throw new ConfigException("config field 'q_lora_rank' must be set: the sparse-attention indexer projects from the q LoRA latent");
        using (b.Scope("indexer", className))
        {
            b.Linear("wq_b", qRank, heads * headDim);
            b.Linear("wk", hidden, headDim);
            b.LayerNorm("k_norm", headDim);
            b.Linear("weights_proj", hidden, heads);
        }
    }

    /// <summary>Where a router's persistent <c>e_score_correction_bias</c> buffer sits.</summary>
    public enum ScoreBias
    {
        /// <summary>The router has none.</summary>
        None,

        /// <summary><c>gate.e_score_correction_bias</c> at runtime and on disk.</summary>
        OnRouter,

        /// <summary><c>gate.e_score_correction_bias</c> at runtime, the MoE block's <c>e_score_correction_bias</c> on disk.</summary>
        OnBlockOnDisk,
    }

    /// <summary>
    /// The DeepSeek-V3-style MoE block named <c>mlp</c>: experts, gate (a TopK router holding weight [E, H]), then
    /// shared_experts (one gated MLP of <paramref name="sharedInter"/>; none when 0). Transformers 5 fuses the experts;
    /// the checkpoint layout (<see cref="Layout.V4"/>) holds them as <c>experts.{e}.gate_proj/up_proj/down_proj</c>, a
    /// ModuleList of <c>{prefix}MLP</c>.
    /// </summary>
    public static void SharedExpertMoe(TreeBuilder b, Layout layout, string prefix, string moeClass, long experts, long hidden,
        long moeInter, long sharedInter, string actClass, ScoreBias bias, string routerClass = "")
    {
        using (b.Scope("mlp", moeClass, ModuleLocation.Other))
        {
            if (layout == Layout.V5) FusedExperts(b, prefix + "Experts", experts, hidden, moeInter, actClass);
            else PerExpertMlps(b, "ModuleList", prefix + "MLP", experts, hidden, moeInter, actClass);
            using (b.Scope("gate", routerClass.Length > 0 ? routerClass : prefix + "TopkRouter", ModuleLocation.Router, kind: ModuleKind.Router))
            {
                b.Param("weight", experts, hidden);
                if (bias == ScoreBias.OnRouter || (bias == ScoreBias.OnBlockOnDisk && layout == Layout.V5))
                    b.Buffer("e_score_correction_bias", experts);
            }
            if (sharedInter > 0)
                GatedMlp(b, "shared_experts", prefix + "MLP", hidden, sharedInter, false, actClass, ModuleLocation.SharedExpert);
            if (bias == ScoreBias.OnBlockOnDisk && layout == Layout.V4) b.Buffer("e_score_correction_bias", experts);
        }
    }

    /// <summary>
    /// The routing of DeepSeek-V3's grouped TopK router and its copies, in words: scoring, the correction bias used for
    /// selection only, group-limited selection (when more than one group), renormalisation and scaling.
    /// </summary>
    public static string GroupedTopKRouting(string scoring, bool correctionBias, long groups, long topkGroup, long topK,
        long experts, bool renormalise, double scale)
    {
        var text = scoring + " scores" + (correctionBias ? " + e_score_correction_bias (selection only)" : "");
        if (groups > 1) text += $", group-limited ({groups} groups, top {topkGroup})";
        text += $", top-{topK} of {experts}";
        if (renormalise) text += ", renormalised";
        return text + ", scaled by " + scale.ToString(CultureInfo.InvariantCulture);
    }

    /// <summary>Which layers are MoE from <c>mlp_layer_types</c> ("sparse"/"dense"), else the given rule.</summary>
    public static (List<int> Moe, List<int> Dense) SplitByMlpLayerTypes(ModelConfig c, long layers, Func<int, bool> fallbackIsMoe,
        string sparse = "sparse", string key = "mlp_layer_types")
    {
        var types = c.StringList(key);
        if (types is null) return SplitLayers(layers, fallbackIsMoe);
        if (types.Count < layers)
            throw new ConfigException($"config field '{key}' has {types.Count} entries for {layers} layers");
        return SplitLayers(layers, i => types[i] == sparse);
    }
}
