using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Solar Open (<c>solar_open</c>): GLM-4.5's MoE block (sigmoid grouped TopK router with the persistent
/// <c>e_score_correction_bias</c>, shared experts fused into one MLP) in every layer, on Llama attention (q/k/v bias per
/// <c>attention_bias</c>, o_proj never). It did not exist in transformers 4.57: <see cref="Layout.V4"/> means the on-disk
/// checkpoint layout, per-expert <c>experts.{e}.gate_proj/up_proj/down_proj</c> (a ModuleList of SolarOpenMLP).
/// </summary>
internal sealed class SolarOpenFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["solar_open"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: SolarOpenConfig (5.17).
        var vocab = c.Positive("vocab_size", 196608);
        var hidden = c.Positive("hidden_size", 4096);
        var layers = c.Positive("num_hidden_layers", 48);
        var heads = c.Positive("num_attention_heads", 64);
        var kv = c.IntOrNull("num_key_value_heads", 8) ?? heads;
        var headDim = Blocks.HeadDim(c, hidden, heads, 128);
        var experts = c.FirstInt("n_routed_experts", "num_local_experts") ?? 128;
        var shared = c.Int("n_shared_experts", 1);
        var topK = c.Positive("num_experts_per_tok", 8);
        var moeInter = c.Positive("moe_intermediate_size", 1280);
        var attnBias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var sharedInter = moeInter * shared;

        var b = new TreeBuilder("SolarOpenForCausalLM", layout);
        Blocks.CausalLm(b, "SolarOpen", vocab, hidden, layers, tie, i =>
        {
            Blocks.Attention(b, "SolarOpenAttention", hidden, heads, kv, headDim, attnBias, false);
            Blocks.SharedExpertMoe(b, layout, "SolarOpen", "SolarOpenMoE", experts, hidden, moeInter, sharedInter, actClass,
                Blocks.ScoreBias.OnRouter);
            b.RmsNorm("input_layernorm", "SolarOpenRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "SolarOpenRMSNorm", hidden, ModuleLocation.Norm);
        });

        var routing = Blocks.GroupedTopKRouting("sigmoid", true, c.Int("n_group", 1), c.Int("topk_group", 1), topK, experts,
            c.Bool("norm_topk_prob", true), c.Double("routed_scaling_factor", 1.0));
        var moe = new MoeFacts(experts, topK, shared, moeInter, sharedInter, Enumerable.Range(0, (int)layers).ToList(), [], routing);
        var spec = Blocks.Spec(c, "solar_open", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        // Runtime: Llama attention rotates the whole head with the table of partial_rotary_factor (SolarOpenConfig
        // defaults it to 1.0); a smaller factor gives cos/sin narrower than the head, which transformers cannot apply.
        var factor = RopeSettings.PartialRotaryFactor(c, 1.0);
        var rotaryDim = (long)(headDim * factor);
        if (rotaryDim != headDim)
            return spec with { RuntimeUnavailable = $"partial_rotary_factor {factor} (Llama attention rotates whole heads; transformers fails too)" };
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-5));
        var attention = new StandardAttentionSettings(heads, kv, headDim, attnBias, false, QkNormKind.None, norm.Eps, Sinks: false,
            MaskSettings.Full, headDim);
        var sparse = new MoeSettings(
            new SigmoidGroupLimitedRouterSettings("gate", experts, topK, c.Int("n_group", 1), c.Int("topk_group", 1),
                c.Bool("norm_topk_prob", true), c.Double("routed_scaling_factor", 1.0)),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
            sharedInter > 0 ? new SharedExpertSettings("shared_experts", sharedInter, act, SigmoidGateName: null) : null, MoeOrder.ExpertsFirst);
        var layer = new DecoderLayerRuntime(attention, "mlp", sparse, norm, norm);
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm,
                RopeSettings.Read(c, 1_000_000.0, rotaryDim), Enumerable.Repeat(layer, (int)layers).ToList()),
        };
    }
}
