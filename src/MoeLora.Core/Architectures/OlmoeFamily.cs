using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// OLMoE (<c>olmoe</c>) and FlexOlmo (<c>flex_olmo</c>, whose modular file derives it from OLMoE and OLMo 2): every
/// layer MoE, no shared expert, q/k norms over the whole projection width (not per head).
/// <para>
/// olmoe: pre-norm (input_layernorm, post_attention_layernorm), head_dim = hidden / heads, q_norm over hidden.
/// flex_olmo: OLMo 2's post-norm (post_attention_layernorm, post_feedforward_layernorm, no input_layernorm), head_dim
/// from <c>config.head_dim</c> when set, q_norm over heads·head_dim.
/// </para>
/// <para>
/// v4 is the on-disk checkpoint layout (what save_pretrained writes): gate.weight and per-expert
/// <c>experts.{e}.gate_proj/up_proj/down_proj</c>, built as an nn.ModuleList of the type's MLP class.
/// </para>
/// </summary>
internal sealed class OlmoeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["olmoe", "flex_olmo"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var flex = c.ModelType == "flex_olmo";
        var p = flex ? "FlexOlmo" : "Olmoe";
        // Defaults: OlmoeConfig / FlexOlmoConfig.
        var vocab = c.Positive("vocab_size", flex ? 100352 : 50304);
        var hidden = c.Positive("hidden_size", flex ? 4096 : 2048);
        var inter = c.Positive("intermediate_size", flex ? 11008 : 2048);
        var layers = c.Positive("num_hidden_layers", flex ? 32 : 16);
        var heads = c.Positive("num_attention_heads", flex ? 32 : 16);
        var kv = c.IntOrNull("num_key_value_heads", null) ?? heads;
        // FlexOlmoAttention: getattr(config, "head_dim", hidden // heads); OlmoeAttention always hidden // heads.
        var headDim = flex ? Blocks.HeadDim(c, hidden, heads) : hidden / heads;
        var experts = c.FirstInt("num_experts", "num_local_experts") ?? (flex ? 7 : 64);
        var topK = c.Positive("num_experts_per_tok", flex ? 5 : 8);
        var bias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        var b = new TreeBuilder(p + "ForCausalLM", layout);
        Blocks.CausalLm(b, p, vocab, hidden, layers, tie, _ =>
        {
            Blocks.Attention(b, p + "Attention", hidden, heads, kv, headDim, bias, bias, afterProjections: bb =>
            {
                bb.RmsNorm("q_norm", p + "RMSNorm", flex ? heads * headDim : hidden);
                bb.RmsNorm("k_norm", p + "RMSNorm", headDim * kv);
            });
            using (b.Scope("mlp", p + "SparseMoeBlock", ModuleLocation.Other))
            {
                if (layout == Layout.V5)
                {
                    Blocks.TopKRouter(b, "gate", p + "TopKRouter", experts, hidden);
                    Blocks.FusedExperts(b, p + "Experts", experts, hidden, inter, actClass);
                }
                else
                {
                    b.Linear("gate", hidden, experts, location: ModuleLocation.Router);
                    Blocks.PerExpertMlps(b, flex ? "ModuleList" : "OlmoeExperts", p + "MLP", experts, hidden, inter, actClass);
                }
            }
            if (!flex) b.RmsNorm("input_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
            if (flex) b.RmsNorm("post_feedforward_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
        });
        var all = Enumerable.Range(0, (int)layers).ToList();
        var normTopK = c.Bool("norm_topk_prob", false);
        var routing = $"softmax over {experts} experts, top-{topK}" + (normTopK ? ", renormalised" : "");
        var moe = new MoeFacts(experts, topK, 0, inter, 0, all, [], routing);
        var spec = Blocks.Spec(c, c.ModelType!, b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        if (!flex && c.Has("clip_qkv"))
            return spec with { RuntimeUnavailable = "clip_qkv (OLMoE's clamped q/k/v)" };
        // FlexOlmoRMSNorm multiplies by the weight before casting back; OlmoeRMSNorm casts first.
        var norm = new NormSettings(flex ? NormKind.RmsWeightInFp32 : NormKind.Rms, c.Double("rms_norm_eps", flex ? 1e-6 : 1e-5));
        // FlexOlmo (OLMo 2): h = x + post_attention_layernorm(attn(x)); out = h + post_feedforward_layernorm(mlp(h)).
        var form = flex
            ? new LayerForm(["self_attn", "mlp", "post_attention_layernorm", "post_feedforward_layernorm"], null,
                new NamedNorm("post_attention_layernorm", norm), null, new NamedNorm("post_feedforward_layernorm", norm))
            : null;
        var layer = new DecoderLayerRuntime(
            new StandardAttentionSettings(heads, kv, headDim, bias, bias, QkNormKind.Full, norm.Eps, Sinks: false, MaskSettings.Full, RotaryDim: headDim),
            "mlp",
            new MoeSettings(new SoftmaxTopKRouterSettings("gate", experts, topK, normTopK),
                new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, inter, act), Shared: null, MoeOrder.RouterFirst),
            norm, norm, form);
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm,
                RopeSettings.Read(c, flex ? 500000.0 : 10000.0, headDim), Enumerable.Repeat(layer, (int)layers).ToList()),
        };
    }
}
