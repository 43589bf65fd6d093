using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// OLMoE: every layer MoE, no shared expert; attention has a q_norm over the full hidden size and a k_norm over
/// the key/value width.
/// </summary>
internal sealed class OlmoeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["olmoe"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var vocab = c.Positive("vocab_size", 50304);
        var hidden = c.Positive("hidden_size", 2048);
        var inter = c.Positive("intermediate_size", 2048);
        var layers = c.Positive("num_hidden_layers", 16);
        var heads = c.Positive("num_attention_heads", 16);
        var kv = c.IntOrNull("num_key_value_heads", null) ?? heads;
        var headDim = hidden / heads;
        var experts = c.FirstInt("num_experts", "num_local_experts") ?? 64;
        var topK = c.Positive("num_experts_per_tok", 8);
        var bias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        var b = new TreeBuilder("OlmoeForCausalLM", layout);
        Blocks.CausalLm(b, "Olmoe", vocab, hidden, layers, tie, _ =>
        {
            Blocks.Attention(b, "OlmoeAttention", hidden, heads, kv, headDim, bias, bias, afterProjections: bb =>
            {
                bb.RmsNorm("q_norm", "OlmoeRMSNorm", hidden);
                bb.RmsNorm("k_norm", "OlmoeRMSNorm", headDim * kv);
            });
            using (b.Scope("mlp", "OlmoeSparseMoeBlock", ModuleLocation.Other))
            {
                if (layout == Layout.V5)
                {
                    Blocks.TopKRouter(b, "gate", "OlmoeTopKRouter", experts, hidden);
                    Blocks.FusedExperts(b, "OlmoeExperts", experts, hidden, inter, actClass);
                }
                else
                {
                    b.Linear("gate", hidden, experts, location: ModuleLocation.Router);
                    Blocks.PerExpertMlps(b, "OlmoeExperts", "OlmoeMLP", experts, hidden, inter, actClass);
                }
            }
            b.RmsNorm("input_layernorm", "OlmoeRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "OlmoeRMSNorm", hidden, ModuleLocation.Norm);
        });
        var all = Enumerable.Range(0, (int)layers).ToList();
        var normTopK = c.Bool("norm_topk_prob", false);
        var routing = $"softmax over {experts} experts, top-{topK}" + (normTopK ? ", renormalised" : "");
        var moe = new MoeFacts(experts, topK, 0, inter, 0, all, [], routing);
        var spec = Blocks.Spec(c, "olmoe", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        if (c.Has("clip_qkv"))
            return spec with { RuntimeUnavailable = "clip_qkv (OLMoE's clamped q/k/v)" };
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-5));
        var layer = new DecoderLayerRuntime(
            new StandardAttentionSettings(heads, kv, headDim, bias, bias, QkNormKind.Full, norm.Eps, Sinks: false, MaskSettings.Full, RotaryDim: headDim),
            "mlp",
            new MoeSettings(new SoftmaxTopKRouterSettings("gate", experts, topK, normTopK),
                new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, inter, act), Shared: null, MoeOrder.RouterFirst),
            norm, norm);
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm,
                RopeSettings.Read(c, 10000.0, headDim), Enumerable.Repeat(layer, (int)layers).ToList()),
        };
    }
}
