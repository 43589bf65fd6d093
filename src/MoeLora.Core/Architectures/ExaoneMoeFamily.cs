using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// EXAONE MoE (<c>exaone_moe</c>): EXAONE-4 attention (per-head q/k RMSNorm after the projections, no biases) and
/// DeepSeek-V3's MoE block (sigmoid grouped TopK router with <c>e_score_correction_bias</c>, <c>num_shared_experts</c>
/// shared experts fused into one MLP), dense or MoE per <c>mlp_layer_types</c> (default: the first
/// <c>first_k_dense_replace</c> dense). It did not exist in transformers 4.57: <see cref="Layout.V4"/> means the on-disk
/// checkpoint layout: per-expert <c>experts.{e}.gate_proj/up_proj/down_proj</c> (a ModuleList of ExaoneMoeMLP), and
/// the correction bias as the MoE block's <c>mlp.e_score_correction_bias</c>.
/// </summary>
internal sealed class ExaoneMoeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["exaone_moe"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: ExaoneMoeConfig (5.17).
        var vocab = c.Positive("vocab_size", 102400);
        var hidden = c.Positive("hidden_size", 4096);
        var inter = c.Positive("intermediate_size", 16384);
        var layers = c.Positive("num_hidden_layers", 32);
        var heads = c.Positive("num_attention_heads", 32);
        var kv = c.IntOrNull("num_key_value_heads", 32) ?? heads;
        // ExaoneMoeAttention: getattr(config, "head_dim", hidden // heads); the config class has no head_dim field.
        var headDim = Blocks.HeadDim(c, hidden, heads);
        var experts = c.Positive("num_experts", 64);
        var shared = c.Int("num_shared_experts", 1);
        var topK = c.Positive("num_experts_per_tok", 8);
        var moeInter = c.Positive("moe_intermediate_size", 1024);
        var firstDense = c.Int("first_k_dense_replace", 1);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var sharedInter = moeInter * shared;

        var (moeLayers, denseLayers) = Blocks.SplitByMlpLayerTypes(c, layers, i => i >= firstDense);
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder("ExaoneMoeForCausalLM", layout);
        Blocks.CausalLm(b, "ExaoneMoe", vocab, hidden, layers, tie, i =>
        {
            Blocks.Attention(b, "ExaoneMoeAttention", hidden, heads, kv, headDim, false, false, afterProjections: bb =>
            {
                bb.RmsNorm("q_norm", "ExaoneMoeRMSNorm", headDim);
                bb.RmsNorm("k_norm", "ExaoneMoeRMSNorm", headDim);
            });
            if (moeSet.Contains(i))
                Blocks.SharedExpertMoe(b, layout, "ExaoneMoe", "ExaoneMoeSparseMoEBlock", experts, hidden, moeInter, sharedInter,
                    actClass, Blocks.ScoreBias.OnBlockOnDisk);
            else
                Blocks.GatedMlp(b, "mlp", "ExaoneMoeMLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
            b.RmsNorm("input_layernorm", "ExaoneMoeRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "ExaoneMoeRMSNorm", hidden, ModuleLocation.Norm);
        });

        var routing = Blocks.GroupedTopKRouting("sigmoid", true, c.Int("n_group", 1), c.Int("topk_group", 1), topK, experts,
            c.Bool("norm_topk_prob", true), c.Double("routed_scaling_factor", 2.5));
        var moe = new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers, routing);
        return Blocks.Spec(c, "exaone_moe", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            Runtime = Runtime(c, layers, heads, kv, headDim, moeSet, experts, topK, moeInter, sharedInter, inter, act, vocab, hidden, tie),
        };
    }

    /// <summary>
    /// EXAONE-4 attention (per-head q/k norms before rope): sliding layers (<c>layer_types</c>, default every
    /// <c>sliding_window_pattern</c>-th layer full) use the window and rope; while <c>sliding_window</c> is set, the
    /// full layers use no rope at all (global NoPE). DeepSeek-V3's group-limited sigmoid router, shared experts added.
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig c, long layers, long heads, long kv, long headDim, HashSet<int> moeSet,
        long experts, long topK, long moeInter, long sharedInter, long inter, string act, long vocab, long hidden, bool tie)
    {
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-5));
        var window = c.IntOrNull("sliding_window", 4096);
        // ExaoneMoeConfig: sliding_window None sets the pattern to 0 (no sliding layer).
        var pattern = window is null ? 0 : c.Int("sliding_window_pattern", 4);
        var types = c.StringList("layer_types")
            ?? Enumerable.Range(0, (int)layers).Select(i => pattern > 0 && (i + 1) % pattern != 0 ? "sliding_attention" : "full_attention").ToList();
        if (types.Count < layers) throw new ConfigException($"config field 'layer_types' has {types.Count} entries for {layers} layers");
        var sparse = new MoeSettings(
            new SigmoidGroupLimitedRouterSettings("gate", experts, topK, c.Int("n_group", 1), c.Int("topk_group", 1),
                c.Bool("norm_topk_prob", true), c.Double("routed_scaling_factor", 2.5)),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
            sharedInter > 0 ? new SharedExpertSettings("shared_experts", sharedInter, act, SigmoidGateName: null) : null, MoeOrder.ExpertsFirst);
        var dense = new GatedMlpSettings(inter, act);
        var noPe = new StandardAttentionOptions(Rotary: RotaryStyle.None);
        var runtimeLayers = Enumerable.Range(0, (int)layers).Select(i =>
        {
            var sliding = types[i] == "sliding_attention";
            var attention = new StandardAttentionSettings(heads, kv, headDim, false, false, QkNormKind.PerHead, norm.Eps, Sinks: false,
                sliding && window is { } w ? new MaskSettings(MaskKind.Sliding, w) : MaskSettings.Full, headDim,
                window is null || sliding ? null : noPe);
            return new DecoderLayerRuntime(attention, "mlp", moeSet.Contains(i) ? sparse : dense, norm, norm);
        }).ToList();
        return new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm,
            RopeSettings.Read(c, 10000.0, headDim), runtimeLayers);
    }
}
