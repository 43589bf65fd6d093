using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// GLM-4.5 / GLM-4.5-Air (<c>glm4_moe</c>): DeepSeek-V3-style MoE on standard GQA attention. The first
/// <c>first_k_dense_replace</c> layers are dense, the rest MoE with a sigmoid TopK router (a plain nn.Module holding
/// <c>weight</c> and the persistent <c>e_score_correction_bias</c> buffer, so never an nn.Linear) and
/// <c>n_shared_experts</c> shared experts fused into one MLP of <c>moe_intermediate_size * n_shared_experts</c>.
/// q/k/v carry a bias when <c>attention_bias</c> (o_proj never does); <c>use_qk_norm</c> adds per-head q/k norms.
/// The checkpoint's MTP layers (<c>num_nextn_predict_layers</c>) are not built by transformers.
/// </summary>
internal sealed class Glm4MoeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["glm4_moe"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: Glm4MoeConfig (5.17; unchanged from 4.57 for the fields that shape the tree).
        var vocab = c.Positive("vocab_size", 151552);
        var hidden = c.Positive("hidden_size", 4096);
        var inter = c.Positive("intermediate_size", 10944);
        var layers = c.Positive("num_hidden_layers", 46);
        var heads = c.Positive("num_attention_heads", 96);
        var kv = c.IntOrNull("num_key_value_heads", 8) ?? heads;
        // Glm4MoeAttention: getattr(config, "head_dim", hidden // heads).
        var headDim = Blocks.HeadDim(c, hidden, heads);
        var experts = c.Positive("n_routed_experts", 128);
        var shared = c.Int("n_shared_experts", 1);
        var topK = c.Positive("num_experts_per_tok", 8);
        var moeInter = c.Positive("moe_intermediate_size", 1408);
        var firstDense = c.Int("first_k_dense_replace", 1);
        var attnBias = c.Bool("attention_bias", false);
        var qkNorm = c.Bool("use_qk_norm", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var sharedInter = moeInter * shared;

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers, i => i >= firstDense);
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder("Glm4MoeForCausalLM", layout);
        Blocks.CausalLm(b, "Glm4Moe", vocab, hidden, layers, tie, i =>
        {
            Blocks.Attention(b, "Glm4MoeAttention", hidden, heads, kv, headDim, attnBias, false, afterProjections: qkNorm
                ? bb =>
                {
                    bb.RmsNorm("q_norm", "Glm4MoeRMSNorm", headDim);
                    bb.RmsNorm("k_norm", "Glm4MoeRMSNorm", headDim);
                }
                : null);
            if (moeSet.Contains(i))
            {
                // Registration order experts, gate, shared_experts in both layouts (as DeepSeek-V3, which it copies).
                using (b.Scope("mlp", "Glm4MoeMoE", ModuleLocation.Other))
                {
                    if (layout == Layout.V5) Blocks.FusedExperts(b, "Glm4MoeExperts", experts, hidden, moeInter, actClass);
                    else Blocks.PerExpertMlps(b, "Glm4MoeNaiveMoe", "Glm4MoeMLP", experts, hidden, moeInter, actClass);
                    Blocks.TopKRouter(b, "gate", "Glm4MoeTopkRouter", experts, hidden);
                    Blocks.GatedMlp(b, "shared_experts", "Glm4MoeMLP", hidden, sharedInter, false, actClass, ModuleLocation.SharedExpert);
                }
            }
            else
            {
                Blocks.GatedMlp(b, "mlp", "Glm4MoeMLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
            }
            b.RmsNorm("input_layernorm", "Glm4MoeRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "Glm4MoeRMSNorm", hidden, ModuleLocation.Norm);
        });

        var router = Router(c, experts, topK);
        var routing = $"sigmoid scores + e_score_correction_bias, group-limited ({router.Groups} groups, top {router.TopKGroups}), " +
            $"top-{topK} of {experts}" + (router.NormTopK ? ", renormalised" : "") +
            $", scaled by {router.RoutedScalingFactor.ToString(System.Globalization.CultureInfo.InvariantCulture)}";
        var moe = new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers, routing);

        return Blocks.Spec(c, "glm4_moe", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            Runtime = Runtime(c, vocab, hidden, inter, layers, heads, kv, headDim, attnBias, qkNorm, router, moeInter, sharedInter,
                act, tie, moeSet),
        };
    }

    /// <summary>
    /// The GLM-4.5 decoder as transformers runs it, from <paramref name="c"/> (the text config) and the sizes its config
    /// class read; the norm and rope fields (same names and defaults in Glm4MoeConfig and Glm4vMoeTextConfig) are read
    /// here. GLM-4.5V's text model is this decoder without q/k norms and runs through here too.
    /// Rope on the first head_dim·partial_rotary_factor dims (0.5 by default), DeepSeek-V3's router.
    /// </summary>
    internal static DecoderRuntime Runtime(ModelConfig c, long vocab, long hidden, long inter, long layers, long heads, long kv,
        long headDim, bool attnBias, bool qkNorm, SigmoidGroupLimitedRouterSettings router, long moeInter, long sharedInter,
        string act, bool tie, IReadOnlySet<int> moeSet)
    {
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-5));
        var rotaryDim = RotaryDim(c, headDim);
        var attention = new StandardAttentionSettings(heads, kv, headDim, attnBias, false, qkNorm ? QkNormKind.PerHead : QkNormKind.None,
            norm.Eps, Sinks: false, MaskSettings.Full, rotaryDim);
        var sparse = new MoeSettings(router, new ExpertsSettings(ExpertsLayout.GateUpOutIn, router.NumExperts, moeInter, act),
            new SharedExpertSettings("shared_experts", sharedInter, act, SigmoidGateName: null), MoeOrder.ExpertsFirst);
        var dense = new GatedMlpSettings(inter, act);
        var runtimeLayers = Enumerable.Range(0, (int)layers)
            .Select(i => new DecoderLayerRuntime(attention, "mlp", moeSet.Contains(i) ? sparse : dense, norm, norm)).ToList();
        return new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm,
            RopeSettings.Read(c, 10000.0, rotaryDim), runtimeLayers);
    }

    /// <summary>
    /// Glm4MoeTopkRouter (DeepSeek-V3's) as <c>mlp.gate</c>: <c>n_group</c>, <c>topk_group</c>, <c>norm_topk_prob</c> and
    /// <c>routed_scaling_factor</c>, with Glm4MoeConfig's defaults (Glm4vMoeTextConfig's are the same).
    /// </summary>
    internal static SigmoidGroupLimitedRouterSettings Router(ModelConfig c, long experts, long topK) =>
        new("gate", experts, topK, c.Int("n_group", 1), c.Int("topk_group", 1), c.Bool("norm_topk_prob", true),
            c.Double("routed_scaling_factor", 1.0));

    /// <summary>The rotated dims per head: head_dim·partial_rotary_factor (0.5 unless the config says otherwise).</summary>
    internal static long RotaryDim(ModelConfig c, long headDim) => (long)(headDim * RopeSettings.PartialRotaryFactor(c, 0.5));
}
