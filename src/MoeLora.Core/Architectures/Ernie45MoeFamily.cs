using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// ERNIE 4.5 MoE (<c>ernie4_5_moe</c>): Llama attention, layer i is MoE when <c>(i + 1) % moe_layer_interval == 0</c> and
/// <c>moe_layer_start_index &lt;= i &lt;= moe_layer_end_index</c> (-1: the last layer). <c>use_bias</c> puts a bias on
/// every projection, MLPs and lm_head included. The MoE block registers gate (a TopK router holding weight [E, H] and
/// its <c>moe_statics</c> submodule, whose frozen parameter <c>e_score_correction_bias</c> [1, E] biases selection
/// only), experts, then shared_experts (<c>moe_num_shared_experts</c> fused into one MLP; none when 0).
/// <see cref="Layout.V4"/> is the checkpoint layout as 4.57 built it: an nn.Linear gate, per-expert
/// <c>experts.{e}.gate_proj/up_proj/down_proj</c>, and <c>moe_statics</c> on the MoE block itself.
/// </summary>
internal sealed class Ernie45MoeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["ernie4_5_moe"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: Ernie4_5_MoeConfig (5.17); num_experts and num_experts_per_tok are attribute_map aliases.
        var vocab = c.Positive("vocab_size", 103424);
        var hidden = c.Positive("hidden_size", 2560);
        var inter = c.Positive("intermediate_size", 12288);
        var layers = c.Positive("num_hidden_layers", 28);
        var heads = c.Positive("num_attention_heads", 20);
        var kv = c.IntOrNull("num_key_value_heads", 4) ?? heads;
        // Ernie4_5_MoeAttention: getattr(config, "head_dim", hidden // heads); the config class has no head_dim field.
        var headDim = Blocks.HeadDim(c, hidden, heads);
        var bias = c.Bool("use_bias", false);
        var moeInter = c.Positive("moe_intermediate_size", 1536);
        var topK = c.FirstInt("moe_k", "num_experts_per_tok") ?? 6;
        var experts = c.FirstInt("moe_num_experts", "num_experts") ?? 64;
        var shared = c.Int("moe_num_shared_experts", 2);
        var start = c.Int("moe_layer_start_index", 1);
        var end = c.Int("moe_layer_end_index", -1);
        if (end == -1) end = layers - 1;
        var interval = c.Positive("moe_layer_interval", 1);
        var tie = c.Bool("tie_word_embeddings", true);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var sharedInter = moeInter * shared;

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers, i => (i + 1) % interval == 0 && i >= start && i <= end);
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder("Ernie4_5_MoeForCausalLM", layout);
        Blocks.CausalLm(b, "Ernie4_5_Moe", vocab, hidden, layers, tie, i =>
        {
            Blocks.Attention(b, "Ernie4_5_MoeAttention", hidden, heads, kv, headDim, bias, bias);
            if (!moeSet.Contains(i))
            {
                Blocks.GatedMlp(b, "mlp", "Ernie4_5_MoeMLP", hidden, inter, bias, actClass, ModuleLocation.Mlp);
            }
            else
            {
                using (b.Scope("mlp", "Ernie4_5_MoeSparseMoeBlock", ModuleLocation.Other))
                {
                    if (layout == Layout.V5)
                    {
                        Router(b, "Ernie4_5_MoeTopKRouter", "Ernie4_5_MoeStatics", experts, hidden);
                        Blocks.FusedExperts(b, "Ernie4_5_MoeExperts", experts, hidden, moeInter, actClass);
                    }
                    else
                    {
                        b.Linear("gate", hidden, experts, location: ModuleLocation.Router);
                        Blocks.PerExpertMlps(b, "ModuleList", "Ernie4_5_MoeMLP", experts, hidden, moeInter, actClass);
                    }
                    if (shared > 0)
                        Blocks.GatedMlp(b, "shared_experts", "Ernie4_5_MoeMLP", hidden, sharedInter, bias, actClass, ModuleLocation.SharedExpert);
                    if (layout == Layout.V4) Statics(b, "Ernie4_5_MoeStatics", experts);
                }
            }
            b.RmsNorm("input_layernorm", "Ernie4_5_MoeRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "Ernie4_5_MoeRMSNorm", hidden, ModuleLocation.Norm);
        }, lmHeadBias: bias);

        var moe = new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers,
            $"softmax over {experts} experts, top-{topK} picked on scores + moe_statics.e_score_correction_bias, renormalised");
        // Runtime: Llama attention with GLM-style rope on adjacent pairs (in fp32); the router keeps its weight and
        // statics in fp32 and selects on softmax + bias; use_bias reaches every projection, the MLPs and lm_head.
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-5));
        var attention = AttentionSettings(heads, kv, headDim, bias, norm);
        var sparse = Sparse(c, experts, topK, moeInter, act,
            shared > 0 ? new SharedExpertSettings("shared_experts", sharedInter, act, SigmoidGateName: null, Bias: bias) : null);
        var dense = new GatedMlpSettings(inter, act, bias);
        var runtimeLayers = Enumerable.Range(0, (int)layers)
            .Select(i => new DecoderLayerRuntime(attention, "mlp", moeSet.Contains(i) ? sparse : dense, norm, norm)).ToList();
        return Blocks.Spec(c, "ernie4_5_moe", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm,
                RopeSettings.Read(c, 500000.0, headDim), runtimeLayers, LmHeadBias: bias),
        };
    }

    /// <summary>
    /// ERNIE 4.5's attention (Ernie 4.5 VL's text attention too): Llama attention with <c>use_bias</c> on q, k, v and o,
    /// the rope rotating adjacent pairs with its tables and the rotation in fp32.
    /// </summary>
    internal static StandardAttentionSettings AttentionSettings(long heads, long kv, long headDim, bool bias, NormSettings norm) =>
        new(heads, kv, headDim, bias, bias, QkNormKind.None, norm.Eps, Sinks: false, MaskSettings.Full, headDim,
            new StandardAttentionOptions(Rotary: RotaryStyle.InterleavedPairs, RopeTablesInFp32: true));

    /// <summary>
    /// ERNIE's sparse block: the <c>gate</c> router (softmax, top-k on softmax + statics, renormalised with
    /// <c>moe_norm_min</c>), fused experts of width <paramref name="inter"/>, then <paramref name="shared"/> if any.
    /// Ernie 4.5 VL's text and vision blocks are two of these without the shared expert.
    /// </summary>
    internal static MoeSettings Sparse(ModelConfig c, long experts, long topK, long inter, string act, SharedExpertSettings? shared) =>
        new(new SoftmaxStaticsTopKRouterSettings("gate", experts, topK, c.Double("moe_norm_min", 1e-12)),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, inter, act), shared, MoeOrder.RouterFirst);

    /// <summary>
    /// ERNIE's transformers-5 router as <c>gate</c>: weight [E, H] (not an nn.Linear), then its <c>moe_statics</c>
    /// (see <see cref="Statics"/>). Ernie 4.5 VL's text and vision MoE blocks hold one each.
    /// </summary>
    internal static void Router(TreeBuilder b, string routerClass, string staticsClass, long experts, long hidden)
    {
        using (b.Scope("gate", routerClass, ModuleLocation.Router, kind: ModuleKind.Router))
        {
            b.Param("weight", experts, hidden);
            Statics(b, staticsClass, experts);
        }
    }

    /// <summary>
    /// <c>moe_statics</c>: the frozen parameter <c>e_score_correction_bias</c> [groups, E] that biases expert selection
    /// only (one group at run time; a checkpoint of Ernie 4.5 VL stores its text and vision rows as two groups).
    /// </summary>
    internal static void Statics(TreeBuilder b, string className, long experts, long groups = 1)
    {
        using (b.Scope("moe_statics", className, ModuleLocation.Router, kind: ModuleKind.Other))
            b.Param("e_score_correction_bias", groups, experts);
    }
}
