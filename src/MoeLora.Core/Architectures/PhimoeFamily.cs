using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Phi-3.5-MoE (<c>phimoe</c>): Mixtral-like, every layer MoE with <c>num_local_experts</c> experts of
/// <c>intermediate_size</c>, Llama attention with <c>attention_bias</c> on q/k/v/o, an nn.LayerNorm final norm and an
/// optional lm_head bias (<c>lm_head_bias</c>). The router subclasses nn.Linear in both layouts, so PEFT's all-linear
/// reaches it.
/// <para>
/// transformers 5.17: block <c>mlp</c> = router (PhimoeTopKRouter) then fused experts; the decoder layer norms are
/// nn.LayerNorm with bias.
/// </para>
/// <para>
/// transformers 4.57 (after PR #40132, which rebuilt PhiMoE on Mixtral's classes): block <c>block_sparse_moe</c> =
/// gate (PhimoeRouter) then per-expert w1/w2/w3; the decoder layer norms became PhimoeRMSNorm (weight only) and
/// PhimoeForCausalLM inherited Mixtral's bias-free lm_head, so <c>lm_head_bias</c> is ignored there. Both are
/// regressions that 5.x reverted (transformers-moe-layouts §4.10; modular_phimoe.py of that era).
/// </para>
/// </summary>
internal sealed class PhimoeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["phimoe"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: PhimoeConfig.
        var vocab = c.Positive("vocab_size", 32064);
        var hidden = c.Positive("hidden_size", 4096);
        var inter = c.Positive("intermediate_size", 6400);
        var layers = c.Positive("num_hidden_layers", 32);
        var heads = c.Positive("num_attention_heads", 32);
        var kv = c.IntOrNull("num_key_value_heads", 8) ?? heads;
        var headDim = Blocks.HeadDim(c, hidden, heads);
        var experts = c.Positive("num_local_experts", 16);
        var topK = c.Positive("num_experts_per_tok", 2);
        var bias = c.Bool("attention_bias", false);
        var lmHeadBias = layout == Layout.V5 && c.Bool("lm_head_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        var b = new TreeBuilder("PhimoeForCausalLM", layout);
        Blocks.CausalLm(b, "Phimoe", vocab, hidden, layers, tie, _ =>
        {
            Blocks.Attention(b, "PhimoeAttention", hidden, heads, kv, headDim, bias, bias);
            if (layout == Layout.V5)
            {
                using (b.Scope("mlp", "PhimoeSparseMoeBlock", ModuleLocation.Other))
                {
                    b.Linear("router", hidden, experts, className: "PhimoeTopKRouter", location: ModuleLocation.Router);
                    Blocks.FusedExperts(b, "PhimoeExperts", experts, hidden, inter, actClass);
                }
                b.LayerNorm("input_layernorm", hidden, location: ModuleLocation.Norm);
                b.LayerNorm("post_attention_layernorm", hidden, location: ModuleLocation.Norm);
            }
            else
            {
                using (b.Scope("block_sparse_moe", "PhimoeSparseMoeBlock", ModuleLocation.Other))
                {
                    b.Linear("gate", hidden, experts, className: "PhimoeRouter", location: ModuleLocation.Router);
                    Blocks.PerExpertMlps(b, "PhimoeExperts", "PhimoeMLP", experts, hidden, inter, actClass,
                        gate: "w1", up: "w3", down: "w2", mixtralOrder: true);
                }
                b.RmsNorm("input_layernorm", "PhimoeRMSNorm", hidden, ModuleLocation.Norm);
                b.RmsNorm("post_attention_layernorm", "PhimoeRMSNorm", hidden, ModuleLocation.Norm);
            }
        }, layerNormFinal: true, lmHeadBias: lmHeadBias);

        var all = Enumerable.Range(0, (int)layers).ToList();
        var moe = new MoeFacts(experts, topK, 0, inter, 0, all, [], $"sparsemixer over {experts} experts, top-{topK}");
        var spec = Blocks.Spec(c, "phimoe", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);
        // PhimoeRotaryEmbedding: longrope's short table at every length, scaled by short_mscale / long_mscale by length.
        var rope = RopeSettings.Read(c, 1000000.0, headDim) with { PhimoeRotary = true };
        if (topK != 2)
            return spec with { RuntimeUnavailable = $"sparsemixer with num_experts_per_tok {topK} (transformers' sparsemixer always picks 2)" };

        // nn.LayerNorm (weight and bias, eps = rms_norm_eps) everywhere; the sparsemixer router (an nn.Linear); an
        // optional lm_head bias; a sliding-window mask on every layer when sliding_window is set.
        var norm = new NormSettings(NormKind.LayerNorm, c.Double("rms_norm_eps", 1e-5));
        var window = c.IntOrNull("sliding_window", null);
        var mask = window is { } w ? new MaskSettings(MaskKind.Sliding, w) : MaskSettings.Full;
        var layer = new DecoderLayerRuntime(
            new StandardAttentionSettings(heads, kv, headDim, bias, bias, QkNormKind.None, 0, Sinks: false, mask, headDim),
            "mlp",
            new MoeSettings(new SparseMixerRouterSettings("router", experts, c.Double("router_jitter_noise", 0.01)),
                new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, inter, act), Shared: null, MoeOrder.RouterFirst),
            norm, norm);
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, rope,
                Enumerable.Repeat(layer, (int)layers).ToList(), LmHeadBias: lmHeadBias),
        };
    }
}
