using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// dots.llm1 (<c>dots1</c>): Qwen3-style attention (per-head q_norm / k_norm, head_dim from <c>config.head_dim</c> when
/// set) with DeepSeek-V3's MoE block: the first <c>first_k_dense_replace</c> layers are a dense Dots1MLP, the rest
/// register experts, a sigmoid TopK router (whose <c>e_score_correction_bias</c> is a persistent buffer, not a
/// parameter) and one shared-experts MLP of <c>moe_intermediate_size · n_shared_experts</c>.
/// <para>
/// Dots1Config defaults <c>n_routed_experts</c>, <c>n_shared_experts</c> and <c>num_experts_per_tok</c> to None, which
/// transformers cannot build into a MoE layer; here they are required as soon as one layer is MoE.
/// </para>
/// <para>
/// v4 (4.57, same as the checkpoint) keeps <c>gate.weight</c> and per-expert <c>experts.{e}.gate_proj/up_proj/down_proj</c>.
/// </para>
/// </summary>
internal sealed class Dots1Family : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["dots1"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: Dots1Config.
        var vocab = c.Positive("vocab_size", 152064);
        var hidden = c.Positive("hidden_size", 4608);
        var inter = c.Positive("intermediate_size", 10944);
        var moeInter = c.Positive("moe_intermediate_size", 1408);
        var layers = c.Positive("num_hidden_layers", 62);
        var heads = c.Positive("num_attention_heads", 32);
        var kv = c.IntOrNull("num_key_value_heads", 32) ?? heads;
        var headDim = Blocks.HeadDim(c, hidden, heads);
        var firstDense = c.IntOrNull("first_k_dense_replace", 0) ?? 0;
        var bias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers, i => i >= firstDense);
        long experts = 0, topK = 0, shared = 0;
        if (moeLayers.Count > 0)
        {
            experts = Required(c, "n_routed_experts", "num_local_experts");
            topK = Required(c, "num_experts_per_tok");
            shared = Required(c, "n_shared_experts");
        }
        var sharedInter = moeInter * shared;
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder("Dots1ForCausalLM", layout);
        Blocks.CausalLm(b, "Dots1", vocab, hidden, layers, tie, i =>
        {
            Blocks.Attention(b, "Dots1Attention", hidden, heads, kv, headDim, bias, bias, afterProjections: bb =>
            {
                bb.RmsNorm("q_norm", "Dots1RMSNorm", headDim);
                bb.RmsNorm("k_norm", "Dots1RMSNorm", headDim);
            });
            if (moeSet.Contains(i))
            {
                using (b.Scope("mlp", "Dots1MoE", ModuleLocation.Other))
                {
                    if (layout == Layout.V5) Blocks.FusedExperts(b, "Dots1Experts", experts, hidden, moeInter, actClass);
                    else Blocks.PerExpertMlps(b, "ModuleList", "Dots1MLP", experts, hidden, moeInter, actClass);
                    Blocks.TopKRouter(b, "gate", "Dots1TopkRouter", experts, hidden);
                    Blocks.GatedMlp(b, "shared_experts", "Dots1MLP", hidden, sharedInter, false, actClass, ModuleLocation.SharedExpert);
                }
            }
            else
            {
                Blocks.GatedMlp(b, "mlp", "Dots1MLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
            }
            b.RmsNorm("input_layernorm", "Dots1RMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "Dots1RMSNorm", hidden, ModuleLocation.Norm);
        });

        var routing = $"sigmoid scores + e_score_correction_bias, group-limited ({c.IntOrNull("n_group", 1) ?? 1} groups, top " +
            $"{c.IntOrNull("topk_group", 1) ?? 1}), top-{topK} of {experts}" + (c.Bool("norm_topk_prob", false) ? ", renormalised" : "") +
            $", scaled by {c.Double("routed_scaling_factor", 1.0)}, plus {shared} shared expert(s)";
        var moe = moeLayers.Count == 0
            ? MoeFacts.Dense(layers)
            : new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers, routing);
        return Blocks.Spec(c, "dots1", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            Runtime = Runtime(c, layers, heads, kv, headDim, bias, moeSet, experts, topK, moeInter, sharedInter, inter, act, vocab, hidden, tie),
        };
    }

    /// <summary>
    /// Qwen3 attention (per-head q/k norms before rope, full rotary) with a sliding window on the layers
    /// <c>layer_types</c> marks (default: from <c>max_window_layers</c> on, when <c>sliding_window</c> is set) and
    /// DeepSeek-V3's group-limited sigmoid router; the shared experts are always added.
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig c, long layers, long heads, long kv, long headDim, bool bias, HashSet<int> moeSet,
        long experts, long topK, long moeInter, long sharedInter, long inter, string act, long vocab, long hidden, bool tie)
    {
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6));
        var window = c.IntOrNull("sliding_window", 4096);
        var maxWindowLayers = c.IntOrNull("max_window_layers", 62) ?? 62;
        var types = c.StringList("layer_types")
            ?? Enumerable.Range(0, (int)layers).Select(i => window is not null && i >= maxWindowLayers ? "sliding_attention" : "full_attention").ToList();
        if (types.Count < layers) throw new ConfigException($"config field 'layer_types' has {types.Count} entries for {layers} layers");
        MaskSettings Mask(int i) => types[i] == "sliding_attention" && window is { } w ? new MaskSettings(MaskKind.Sliding, w) : MaskSettings.Full;
        var sparse = moeSet.Count == 0 ? null : new MoeSettings(
            new SigmoidGroupLimitedRouterSettings("gate", experts, topK, c.IntOrNull("n_group", 1) ?? 1, c.IntOrNull("topk_group", 1) ?? 1,
                c.Bool("norm_topk_prob", false), c.Double("routed_scaling_factor", 1.0)),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
            new SharedExpertSettings("shared_experts", sharedInter, act, SigmoidGateName: null), MoeOrder.ExpertsFirst);
        var dense = new GatedMlpSettings(inter, act);
        var runtimeLayers = Enumerable.Range(0, (int)layers).Select(i => new DecoderLayerRuntime(
            new StandardAttentionSettings(heads, kv, headDim, bias, bias, QkNormKind.PerHead, norm.Eps, Sinks: false, Mask(i), headDim),
            "mlp", moeSet.Contains(i) ? sparse! : dense, norm, norm)).ToList();
        return new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm,
            RopeSettings.Read(c, 10000.0, headDim), runtimeLayers);
    }

    /// <summary>A field Dots1Config defaults to None but the MoE layers need (a one-line error when absent).</summary>
    private static long Required(ModelConfig c, params string[] names)
    {
        var v = c.FirstInt(names)
            ?? throw new ConfigException($"config field '{names[0]}' is required for dots1 MoE layers (Dots1Config defaults it to None)");
        if (v <= 0) throw new ConfigException($"config field '{names[0]}' must be a positive integer, got {v}");
        return v;
    }
}
