using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// The Qwen3.5 hybrid decoder's pieces, shared by Qwen3.5-MoE and Qwen4-Exp (class names differ only by prefix):
/// the split-projection Gated DeltaNet, the output-gated attention and the MoE block with a sigmoid-gated shared expert.
/// </summary>
internal static partial class Blocks
{
    /// <summary>The Gated DeltaNet sizes (defaults: Qwen3_5MoeTextConfig and Qwen4ExpTextConfig, identical).</summary>
    public sealed record QwenLinearAttentionDims(long ConvKernel, long KHeadDim, long VHeadDim, long KHeads, long VHeads)
    {
        public static QwenLinearAttentionDims Read(ModelConfig text) => new(
            text.Positive("linear_conv_kernel_dim", 4),
            text.Positive("linear_key_head_dim", 128),
            text.Positive("linear_value_head_dim", 128),
            text.Positive("linear_num_key_heads", 16),
            text.Positive("linear_num_value_heads", 32));
    }

    /// <summary>
    /// The hybrid layer pattern (<c>__post_init__</c>): <c>layer_types</c> (legacy names remapped), else every
    /// <c>full_attention_interval</c>-th (4) layer an attention layer named <paramref name="attentionTypes"/>[0] and the
    /// rest "linear_attention"; every entry must be "linear_attention" or one of <paramref name="attentionTypes"/>.
    /// </summary>
    public static IReadOnlyList<string> QwenHybridLayerTypes(ModelConfig text, long layers, IReadOnlyList<string> attentionTypes)
    {
        var interval = text.Positive("full_attention_interval", 4);
        var types = LayerTypes(text)
            ?? Enumerable.Range(0, (int)layers).Select(i => (i + 1) % interval != 0 ? "linear_attention" : attentionTypes[0]).ToList();
        if (types.Count < layers)
            throw new ConfigException($"config field 'layer_types' has {types.Count} entries for {layers} layers");
        CheckLayerTypes(types, "layer_types", ["linear_attention", .. attentionTypes]);
        return types;
    }

    /// <summary>
    /// <c>{P}GatedDeltaNet</c> as <c>linear_attn</c>: dt_bias and A_log [num_v_heads] first, then a depthwise Conv1d over
    /// q|k|v (no bias), the gated RMSNorm over head_v_dim, out_proj, and the four input projections.
    /// </summary>
    public static void QwenGatedDeltaNet(TreeBuilder b, string p, long hidden, QwenLinearAttentionDims d)
    {
        var keyDim = d.KHeadDim * d.KHeads;
        var valueDim = d.VHeadDim * d.VHeads;
        using (b.Scope("linear_attn", p + "GatedDeltaNet", ModuleLocation.Attention))
        {
            b.Param("dt_bias", d.VHeads);
            b.Param("A_log", d.VHeads);
            // A depthwise nn.Conv1d: all-linear never selects it.
            using (b.Scope("conv1d", "Conv1d", kind: ModuleKind.Other))
                b.Param("weight", keyDim * 2 + valueDim, 1, d.ConvKernel);
            b.RmsNorm("norm", p + "RMSNormGated", d.VHeadDim);
            b.Linear("out_proj", valueDim, hidden);
            b.Linear("in_proj_qkv", hidden, keyDim * 2 + valueDim);
            b.Linear("in_proj_z", hidden, valueDim);
            b.Linear("in_proj_b", hidden, d.VHeads);
            b.Linear("in_proj_a", hidden, d.VHeads);
        }
    }

    /// <summary>
    /// <c>{P}Attention</c> as <c>self_attn</c>: q_proj (which also produces the per-head output gate, hence
    /// 2·heads·head_dim), k_proj, v_proj, o_proj, then the per-head q_norm and k_norm (<c>{P}RMSNorm</c>);
    /// <paramref name="after"/> registers what the attention adds after them (Qwen4-Exp's QSA indexer).
    /// </summary>
    public static void QwenGatedAttention(TreeBuilder b, string p, long hidden, long heads, long kvHeads, long headDim, bool bias,
        Action? after = null)
    {
        using (b.Scope("self_attn", p + "Attention", ModuleLocation.Attention))
        {
            b.Linear("q_proj", hidden, heads * headDim * 2, bias);
            b.Linear("k_proj", hidden, kvHeads * headDim, bias);
            b.Linear("v_proj", hidden, kvHeads * headDim, bias);
            b.Linear("o_proj", heads * headDim, hidden, bias);
            b.RmsNorm("q_norm", p + "RMSNorm", headDim);
            b.RmsNorm("k_norm", p + "RMSNorm", headDim);
            after?.Invoke();
        }
    }

    /// <summary>
    /// <c>{P}SparseMoeBlock</c> as <c>mlp</c>: the softmax top-k router <c>gate</c> (<c>{P}TopKRouter</c>), the experts
    /// (fused <c>{P}Experts</c> in <see cref="Layout.V5"/>, a ModuleList of <c>{P}MLP</c> in <see cref="Layout.V4"/>),
    /// the shared expert (<c>{P}MLP</c>) and its one-output sigmoid gate <c>shared_expert_gate</c>.
    /// </summary>
    public static void QwenSharedExpertMoe(TreeBuilder b, Layout layout, string p, long experts, long hidden, long moeInter,
        long sharedInter, string actClass)
    {
        using (b.Scope("mlp", p + "SparseMoeBlock", ModuleLocation.Other))
        {
            TopKRouter(b, "gate", p + "TopKRouter", experts, hidden);
            if (layout == Layout.V5) FusedExperts(b, p + "Experts", experts, hidden, moeInter, actClass);
            else PerExpertMlps(b, "ModuleList", p + "MLP", experts, hidden, moeInter, actClass);
            GatedMlp(b, "shared_expert", p + "MLP", hidden, sharedInter, false, actClass, ModuleLocation.SharedExpert);
            b.Linear("shared_expert_gate", hidden, 1, location: ModuleLocation.SharedExpert);
        }
    }
}
