using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Qwen2-MoE and Qwen3-MoE. A layer is MoE when it is not in <c>mlp_only_layers</c>, there are experts, and
/// <c>(i + 1) % decoder_sparse_step == 0</c>; other layers get a dense MLP of <c>intermediate_size</c>.
/// Qwen2-MoE adds a shared expert and a sigmoid shared-expert gate; Qwen3-MoE has q/k norms and no shared expert.
/// </summary>
internal sealed class QwenMoeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["qwen2_moe", "qwen3_moe"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var type = c.ModelType!;
        var qwen3 = type == "qwen3_moe";
        var p = qwen3 ? "Qwen3Moe" : "Qwen2Moe";
        var vocab = c.Positive("vocab_size", 151936);
        var hidden = c.Positive("hidden_size", 2048);
        var inter = c.Positive("intermediate_size", qwen3 ? 6144 : 5632);
        var layers = c.Positive("num_hidden_layers", 24);
        var heads = c.Positive("num_attention_heads", qwen3 ? 32 : 16);
        var kv = c.IntOrNull("num_key_value_heads", qwen3 ? 4 : 16) ?? heads;
        var headDim = Blocks.HeadDim(c, hidden, heads);
        var experts = c.FirstInt("num_experts", "num_local_experts") ?? (qwen3 ? 128 : 60);
        var topK = c.Int("num_experts_per_tok", qwen3 ? 8 : 4);
        var moeInter = c.Positive("moe_intermediate_size", qwen3 ? 768 : 1408);
        var sharedInter = qwen3 ? 0 : c.Int("shared_expert_intermediate_size", 5632);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        // qwen2_moe: q/k/v bias from qkv_bias (default True; hard-coded True before 4.57). qwen3_moe: attention_bias.
        var qkvBias = qwen3 ? c.Bool("attention_bias", false) : c.Bool("qkv_bias", true);
        var oBias = qwen3 && c.Bool("attention_bias", false);

        var (moeLayers, denseLayers) = MoeLayers(c, layers, experts);
        var moeSet = moeLayers.ToHashSet();
        var dims = new LayerDims(hidden, heads, kv, headDim, qkvBias, oBias, inter, experts, moeInter, sharedInter, actClass);

        var b = new TreeBuilder(p + "ForCausalLM", layout);
        Blocks.CausalLm(b, p, vocab, hidden, layers, tie, i => Layer(b, p, qwen3, layout, dims, moeSet.Contains(i), p + "Experts"));

        // norm_topk_prob defaults to False in both config classes (transformers 5.17).
        var normTopK = c.Bool("norm_topk_prob", false);
        var routing = $"softmax over {experts} experts, top-{topK}" + (normTopK ? ", renormalised" : "");
        var moe = new MoeFacts(experts, topK, qwen3 ? 0 : 1, moeInter, sharedInter, moeLayers, denseLayers, routing);
        var spec = Blocks.Spec(c, type, b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        if (c.Bool("use_sliding_window", false))
            return spec with { RuntimeUnavailable = "use_sliding_window=true (Qwen's per-layer sliding windows)" };
        return spec with
        {
            Runtime = Runtime(c, qwen3, vocab, hidden, inter, layers, heads, kv, headDim, qkvBias, oBias, experts, topK, normTopK,
                moeInter, sharedInter, act, tie, moeSet, defaultTheta: 10000.0),
        };
    }

    /// <summary>
    /// The Qwen2-MoE / Qwen3-MoE decoder as transformers runs it, from <paramref name="c"/> (the text config) and the
    /// sizes its config class read (each class has its own defaults, <paramref name="defaultTheta"/> its
    /// <c>default_theta</c>). Qwen3-VL-MoE's text model is a Qwen3-MoE decoder
    /// and runs through here too.
    /// </summary>
    internal static DecoderRuntime Runtime(ModelConfig c, bool qwen3, long vocab, long hidden, long inter, long layers, long heads,
        long kv, long headDim, bool qkvBias, bool oBias, long experts, long topK, bool normTopK, long moeInter, long sharedInter,
        string act, bool tie, IReadOnlySet<int> moeSet, double defaultTheta)
    {
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6));
        var attention = new StandardAttentionSettings(heads, kv, headDim, qkvBias, oBias, qwen3 ? QkNormKind.PerHead : QkNormKind.None,
            norm.Eps, Sinks: false, MaskSettings.Full, RotaryDim: headDim);
        var sparse = new MoeSettings(new SoftmaxTopKRouterSettings("gate", experts, topK, normTopK),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
            qwen3 ? null : new SharedExpertSettings("shared_expert", sharedInter, act, SigmoidGateName: "shared_expert_gate"),
            qwen3 ? MoeOrder.ExpertsFirst : MoeOrder.RouterFirst);
        var dense = new GatedMlpSettings(inter, act);
        var runtimeLayers = Enumerable.Range(0, (int)layers)
            .Select(i => new DecoderLayerRuntime(attention, "mlp", moeSet.Contains(i) ? sparse : dense, norm, norm)).ToList();
        return new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm,
            RopeSettings.Read(c, defaultTheta, headDim), runtimeLayers);
    }

    /// <summary>
    /// The Qwen-MoE layer rule, shared by every Qwen2/Qwen3-MoE decoder (Qwen3-VL-MoE's and Qwen3-Omni's thinker's
    /// too): a layer is MoE unless it is in <c>mlp_only_layers</c>, there are no experts, or it is off
    /// <c>decoder_sparse_step</c> (<c>(i + 1) % step == 0</c>).
    /// </summary>
    internal static (List<int> Moe, List<int> Dense) MoeLayers(ModelConfig c, long layers, long experts)
    {
        var step = c.Int("decoder_sparse_step", 1);
        var mlpOnly = new HashSet<long>(c.IntList("mlp_only_layers") ?? []);
        return Blocks.SplitLayers(layers, i => !mlpOnly.Contains(i) && experts > 0 && step > 0 && (i + 1) % step == 0);
    }

    /// <summary>The sizes one Qwen-MoE decoder layer is built from (<paramref name="ActClass"/>: the activation's module class).</summary>
    internal sealed record LayerDims(long Hidden, long Heads, long KvHeads, long HeadDim, bool QkvBias, bool OBias, long Intermediate,
        long Experts, long MoeIntermediate, long SharedIntermediate, string ActClass);

    /// <summary>
    /// One Qwen2-MoE / Qwen3-MoE decoder layer's children, every class named from <paramref name="p"/> (Qwen3-VL-MoE's
    /// text model is <c>Qwen3VLMoeText</c>, Qwen3-Omni's thinker <c>Qwen3OmniMoeThinkerText</c>): self_attn (with
    /// per-head q/k norms for Qwen3), the MoE block or a dense MLP, and the two norms. <paramref name="v4ExpertList"/> is
    /// the class of the per-expert ModuleList in the v4 layout.
    /// </summary>
    internal static void Layer(TreeBuilder b, string p, bool qwen3, Layout layout, LayerDims d, bool moe, string v4ExpertList)
    {
        Blocks.Attention(b, p + "Attention", d.Hidden, d.Heads, d.KvHeads, d.HeadDim, d.QkvBias, d.OBias, afterProjections: qwen3
            ? bb =>
            {
                bb.RmsNorm("q_norm", p + "RMSNorm", d.HeadDim);
                bb.RmsNorm("k_norm", p + "RMSNorm", d.HeadDim);
            }
            : null);
        if (moe) MoeBlock(b, p, qwen3, layout, d, v4ExpertList);
        else Blocks.GatedMlp(b, "mlp", p + "MLP", d.Hidden, d.Intermediate, false, d.ActClass, ModuleLocation.Mlp);
        b.RmsNorm("input_layernorm", p + "RMSNorm", d.Hidden, ModuleLocation.Norm);
        b.RmsNorm("post_attention_layernorm", p + "RMSNorm", d.Hidden, ModuleLocation.Norm);
    }

    private static void MoeBlock(TreeBuilder b, string p, bool qwen3, Layout layout, LayerDims d, string v4ExpertList)
    {
        using (b.Scope("mlp", p + "SparseMoeBlock", ModuleLocation.Other))
        {
            if (layout == Layout.V5)
            {
                // transformers 5: Qwen3-MoE registers experts before the router; Qwen2-MoE the router first.
                if (qwen3)
                {
                    Blocks.FusedExperts(b, p + "Experts", d.Experts, d.Hidden, d.MoeIntermediate, d.ActClass);
                    Blocks.TopKRouter(b, "gate", p + "TopKRouter", d.Experts, d.Hidden);
                }
                else
                {
                    Blocks.TopKRouter(b, "gate", p + "TopKRouter", d.Experts, d.Hidden);
                    Blocks.FusedExperts(b, p + "Experts", d.Experts, d.Hidden, d.MoeIntermediate, d.ActClass);
                }
            }
            else
            {
                b.Linear("gate", d.Hidden, d.Experts, location: ModuleLocation.Router);
                Blocks.PerExpertMlps(b, v4ExpertList, p + "MLP", d.Experts, d.Hidden, d.MoeIntermediate, d.ActClass);
            }
            if (!qwen3)
            {
                Blocks.GatedMlp(b, "shared_expert", p + "MLP", d.Hidden, d.SharedIntermediate, false, d.ActClass, ModuleLocation.SharedExpert);
                b.Linear("shared_expert_gate", d.Hidden, 1, location: ModuleLocation.SharedExpert);
            }
        }
    }
}
