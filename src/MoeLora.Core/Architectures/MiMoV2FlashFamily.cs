using System.Text.Json.Nodes;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// MiMo-V2-Flash (<c>mimo_v2_flash</c>): hybrid attention per <c>layer_types</c> (default: full on layer 0 and every
/// 6th, sliding elsewhere); sliding layers have twice <c>num_key_value_heads</c> and learned attention <c>sinks</c>
/// [heads]. q/k use <c>head_dim</c>, v and o <c>v_head_dim</c>; q/k/v carry attention_bias, o never. Dense or MoE per
/// <c>mlp_layer_types</c> (default: first layer dense); the MoE block is DeepSeek-V3's without shared experts (sigmoid
/// grouped TopK router with <c>e_score_correction_bias</c>). MiMo-V2-Flash did not exist in transformers 4.57:
/// <see cref="Layout.V4"/> means the on-disk checkpoint layout: per-expert
/// <c>experts.{e}.gate_proj/up_proj/down_proj</c> (a ModuleList of MiMoV2FlashMLP) and sinks as
/// <c>attention_sink_bias</c>.
/// </summary>
internal sealed class MiMoV2FlashFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["mimo_v2_flash"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: MiMoV2FlashConfig (5.17).
        var vocab = c.Positive("vocab_size", 152576);
        var hidden = c.Positive("hidden_size", 4096);
        var inter = c.Positive("intermediate_size", 16384);
        var layers = c.Positive("num_hidden_layers", 48);
        var heads = c.Positive("num_attention_heads", 64);
        var kv = c.Positive("num_key_value_heads", 4);
        var headDim = Blocks.HeadDim(c, hidden, heads, 192);
        var vHeadDim = c.Positive("v_head_dim", 128);
        var experts = c.FirstInt("n_routed_experts", "num_local_experts") ?? 256;
        var topK = c.Positive("num_experts_per_tok", 8);
        var moeInter = c.Positive("moe_intermediate_size", 2048);
        var attnBias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        var layerTypes = c.StringList("layer_types")
            ?? Enumerable.Range(0, (int)layers).Select(i => i == 0 || (i + 1) % 6 == 0 ? "full_attention" : "sliding_attention").ToList();
        if (layerTypes.Count < layers)
            throw new ConfigException($"config field 'layer_types' has {layerTypes.Count} entries for {layers} layers");
        var (moeLayers, denseLayers) = Blocks.SplitByMlpLayerTypes(c, layers, i => i >= 1);
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder("MiMoV2FlashForCausalLM", layout);
        Blocks.CausalLm(b, "MiMoV2Flash", vocab, hidden, layers, tie, i =>
        {
            var sliding = layerTypes[i] == "sliding_attention";
            var layerKv = sliding ? 2 * kv : kv;
            using (b.Scope("self_attn", "MiMoV2FlashAttention", ModuleLocation.Attention))
            {
                if (sliding) b.Param(layout == Layout.V5 ? "sinks" : "attention_sink_bias", heads);
                b.Linear("q_proj", hidden, heads * headDim, attnBias);
                b.Linear("k_proj", hidden, layerKv * headDim, attnBias);
                b.Linear("v_proj", hidden, layerKv * vHeadDim, attnBias);
                b.Linear("o_proj", heads * vHeadDim, hidden);
            }
            if (moeSet.Contains(i))
                Blocks.SharedExpertMoe(b, layout, "MiMoV2Flash", "MiMoV2FlashMoE", experts, hidden, moeInter, 0, actClass, Blocks.ScoreBias.OnRouter);
            else
                Blocks.GatedMlp(b, "mlp", "MiMoV2FlashMLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
            b.RmsNorm("input_layernorm", "MiMoV2FlashRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "MiMoV2FlashRMSNorm", hidden, ModuleLocation.Norm);
        });

        var routing = Blocks.GroupedTopKRouting("sigmoid", true, c.Int("n_group", 1), c.Int("topk_group", 1), topK, experts,
            c.Bool("norm_topk_prob", true), c.Double("routed_scaling_factor", 1.0));
        var moe = new MoeFacts(experts, topK, 0, moeInter, 0, moeLayers, denseLayers, routing);
        var spec = Blocks.Spec(c, "mimo_v2_flash", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);
        var rope = c.Sub("rope_parameters");
        if (rope is not null && !(rope.Sub("full_attention") is not null && rope.Sub("sliding_attention") is not null))
            return spec with { RuntimeUnavailable = "rope_parameters without per-layer-type (full_attention / sliding_attention) entries" };
        return spec with
        {
            Runtime = Runtime(c, layers, heads, kv, headDim, vHeadDim, attnBias, layerTypes, moeSet, experts, topK, moeInter, inter, act,
                vocab, hidden, tie),
        };
    }

    /// <summary>
    /// Per layer type its own rope (theta and <c>partial_rotary_factor</c>, default 0.334: the table covers
    /// int(head_dim·factor) dims, rounded up to pairs, the rest of each head passes through) and mask; sliding layers
    /// double the kv heads and add sinks. v is scaled by <c>attention_value_scale</c>; the eager softmax subtracts the
    /// row maximum and runs in the activations' dtype. DeepSeek-V3's router without shared experts.
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig c, long layers, long heads, long kv, long headDim, long vHeadDim, bool attnBias,
        IReadOnlyList<string> layerTypes, HashSet<int> moeSet, long experts, long topK, long moeInter, long inter, string act,
        long vocab, long hidden, bool tie)
    {
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-5));
        var window = c.Positive("sliding_window", 128);
        // attention_value_scale: None means 1.0.
        var valueScale = c.IsExplicitNull("attention_value_scale") ? 1.0 : c.Double("attention_value_scale", 0.707);
        // MiMoV2FlashConfig's default rope_parameters, per layer type.
        (RopeSettings Rope, long RotaryDim) RopeOf(string type)
        {
            double theta = type == "full_attention" ? 5_000_000.0 : 10_000.0, factor = 0.334;
            var sub = c.Sub("rope_parameters")?.Sub(type);
            if (sub is not null) factor = sub.Double("partial_rotary_factor", factor);
            long dim = (long)(headDim * factor);
            var settings = sub is null ? new RopeSettings("default", theta, dim)
                : RopeSettings.Read(new ModelConfig(new JsonObject { ["rope_parameters"] = sub.Json.DeepClone() }), theta, dim);
            return (settings, 2 * ((dim + 1) / 2));
        }
        var sparse = new MoeSettings(
            new SigmoidGroupLimitedRouterSettings("gate", experts, topK, c.Int("n_group", 1), c.Int("topk_group", 1),
                c.Bool("norm_topk_prob", true), c.Double("routed_scaling_factor", 1.0)),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act), Shared: null, MoeOrder.ExpertsFirst);
        var dense = new GatedMlpSettings(inter, act);
        var runtimeLayers = Enumerable.Range(0, (int)layers).Select(i =>
        {
            var sliding = layerTypes[i] == "sliding_attention";
            var (rope, rotaryDim) = RopeOf(sliding ? "sliding_attention" : "full_attention");
            var options = new StandardAttentionOptions(Rope: rope, VHeadDim: vHeadDim, ValueScale: valueScale, SoftmaxInFp32: false);
            var attention = new StandardAttentionSettings(heads, sliding ? 2 * kv : kv, headDim, attnBias, false, QkNormKind.None, norm.Eps,
                Sinks: sliding, sliding ? new MaskSettings(MaskKind.Sliding, window) : MaskSettings.Full, rotaryDim, options);
            return new DecoderLayerRuntime(attention, "mlp", moeSet.Contains(i) ? sparse : dense, norm, norm);
        }).ToList();
        return new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm,
            RopeOf("full_attention").Rope, runtimeLayers);
    }
}
