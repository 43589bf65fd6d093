using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// gpt-oss (identical layout 4.55-5.17): attention sinks (a direct parameter of self_attn, so it is yielded before
/// the projections), biased q/k/v/o, a biased router, and fused biased experts stored (E, in, out) with gate/up
/// interleaved in the last dimension.
/// </summary>
internal sealed class GptOssFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["gpt_oss"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var vocab = c.Positive("vocab_size", 201088);
        var hidden = c.Positive("hidden_size", 2880);
        var inter = c.Positive("intermediate_size", 2880);
        var layers = c.Positive("num_hidden_layers", 36);
        var heads = c.Positive("num_attention_heads", 64);
        var kv = c.IntOrNull("num_key_value_heads", 8) ?? heads;
        var headDim = c.IntOrNull("head_dim", 64) ?? hidden / heads;
        var experts = c.Positive("num_local_experts", 128);
        var topK = c.Positive("num_experts_per_tok", 4);
        var bias = c.Bool("attention_bias", true);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;

        var b = new TreeBuilder("GptOssForCausalLM", layout);
        Blocks.CausalLm(b, "GptOss", vocab, hidden, layers, tie, _ =>
        {
            Blocks.Attention(b, "GptOssAttention", hidden, heads, kv, headDim, bias, bias, beforeProjections: bb => bb.Param("sinks", heads));
            using (b.Scope("mlp", "GptOssMLP", ModuleLocation.Other))
            {
                Blocks.TopKRouter(b, "router", "GptOssTopKRouter", experts, hidden, bias: true);
                using (b.Scope("experts", "GptOssExperts", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts,
                    numExperts: experts, isTransposed: true))
                {
                    b.Param("gate_up_proj", experts, hidden, 2 * inter);
                    b.Param("gate_up_proj_bias", experts, 2 * inter);
                    b.Param("down_proj", experts, inter, hidden);
                    b.Param("down_proj_bias", experts, hidden);
                }
            }
            b.RmsNorm("input_layernorm", "GptOssRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "GptOssRMSNorm", hidden, ModuleLocation.Norm);
        });
        var all = Enumerable.Range(0, (int)layers).ToList();
        var moe = new MoeFacts(experts, topK, 0, inter, 0, all, [], $"top-{topK} of {experts} router logits (with bias), softmax over the selected");
        // GptOssExperts hard-codes its clamp (limit = 7.0; config.swiglu_limit is not read in 5.17).
        // gpt-oss norms multiply by the weight before casting back; layers alternate sliding (even) and full attention
        // unless layer_types says otherwise.
        var norm = new NormSettings(NormKind.RmsWeightInFp32, c.Double("rms_norm_eps", 1e-5));
        var types = c.StringList("layer_types")
            ?? Enumerable.Range(0, (int)layers).Select(i => i % 2 == 0 ? "sliding_attention" : "full_attention").ToList();
        if (types.Count < layers) throw new ConfigException($"config field 'layer_types' has {types.Count} entries for {layers} layers");
        var window = c.IntOrNull("sliding_window", 128) ?? 128;
        var ff = new MoeSettings(new TopKSoftmaxRouterSettings("router", experts, topK, Bias: true),
            new ExpertsSettings(ExpertsLayout.GptOssInterleaved, experts, inter, act, SwigluLimit: 7.0), Shared: null, MoeOrder.RouterFirst);
        var runtimeLayers = Enumerable.Range(0, (int)layers).Select(i => new DecoderLayerRuntime(
            new StandardAttentionSettings(heads, kv, headDim, bias, bias, QkNormKind.None, norm.Eps, Sinks: true,
                types[i] == "sliding_attention" ? new MaskSettings(MaskKind.Sliding, window) : MaskSettings.Full, RotaryDim: headDim),
            "mlp", ff, norm, norm)).ToList();
        return Blocks.Spec(c, "gpt_oss", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm,
                RopeSettings.Read(c, 150000.0, headDim), runtimeLayers),
        };
    }
}
