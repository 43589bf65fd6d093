using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Doge (<c>doge</c>): attention with a learned dynamic mask (A [kv heads] and dt_proj), q/k norms, and learned
/// residual scales on each decoder layer. With <c>is_moe</c> (default false: a dense DogeMLP) the feed-forward is
/// DogeCDMoE: a gated MLP that acts as the shared expert, an nn.Linear <c>router_gate</c> producing
/// 2·⌊√num_experts⌋ product keys, and <c>num_experts</c> single-neuron experts stored as two nn.Embedding tables
/// (<c>down_embed</c>, <c>up_embed</c> [E, H]), which PEFT would adapt as embeddings. transformers 5.17 builds that
/// model but cannot run it (DogeDecoderLayer passes the CDMoE's (states, router logits) tuple to dropout), so only the
/// dense Doge has a runtime here; the analysis of is_moe stands (the model builds) and the report warns.
/// <para>Not in transformers 4.57: <see cref="Layout.V4"/> means the on-disk checkpoint layout, identical to v5.</para>
/// </summary>
internal sealed class DogeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["doge"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: DogeConfig.
        var vocab = c.Positive("vocab_size", 32768);
        var hidden = c.Positive("hidden_size", 1024);
        var inter = c.Positive("intermediate_size", 2048);
        var layers = c.Positive("num_hidden_layers", 32);
        var heads = c.Positive("num_attention_heads", 8);
        var kv = c.IntOrNull("num_key_value_heads", null) ?? heads;
        var headDim = Blocks.HeadDim(c, hidden, heads);
        var attnBias = c.Bool("attention_bias", false);
        var mlpBias = c.Bool("mlp_bias", false);
        var isMoe = c.Bool("is_moe", false);
        var experts = c.Positive("num_experts", 16384);
        var topK = c.Positive("num_experts_per_tok", 64);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var keys = (long)Math.Floor(Math.Sqrt(experts));

        var b = new TreeBuilder("DogeForCausalLM", layout);
        Blocks.TextModel(b, "model", "DogeModel", "DogeDecoderLayer", vocab, hidden, layers, i =>
        {
            b.Param("input_residual", hidden);
            b.Param("post_attention_residual", hidden);
            b.RmsNorm("input_layernorm", "DogeRMSNorm", hidden, ModuleLocation.Norm);
            using (b.Scope("self_attn", "DogeAttention", ModuleLocation.Attention))
            {
                b.Linear("q_proj", hidden, heads * headDim, attnBias);
                b.Linear("k_proj", hidden, kv * headDim, attnBias);
                b.Linear("v_proj", hidden, kv * headDim, attnBias);
                b.Param("A", kv);
                b.Linear("dt_proj", kv * headDim, kv, attnBias);
                b.Linear("o_proj", heads * headDim, hidden, attnBias);
                b.RmsNorm("q_norm", "DogeRMSNorm", headDim);
                b.RmsNorm("k_norm", "DogeRMSNorm", headDim);
            }
            b.RmsNorm("post_attention_layernorm", "DogeRMSNorm", hidden, ModuleLocation.Norm);
            if (!isMoe)
            {
                Blocks.GatedMlp(b, "mlp", "DogeMLP", hidden, inter, mlpBias, actClass, ModuleLocation.Mlp);
                return;
            }
            using (b.Scope("mlp", "DogeCDMoE", ModuleLocation.Other))
            {
                b.Leaf("act_fn", actClass);
                b.Linear("gate_proj", hidden, inter, mlpBias, location: ModuleLocation.SharedExpert);
                b.Linear("up_proj", hidden, inter, mlpBias, location: ModuleLocation.SharedExpert);
                b.Linear("down_proj", inter, hidden, mlpBias, location: ModuleLocation.SharedExpert);
                b.Linear("router_gate", hidden, keys * 2, location: ModuleLocation.Router);
                b.Embedding("down_embed", experts, hidden, ModuleLocation.RoutedExpert);
                b.Embedding("up_embed", experts, hidden, ModuleLocation.RoutedExpert);
            }
        }, "DogeRMSNorm", "DogeRotaryEmbedding");
        Blocks.LmHead(b, hidden, vocab, tie, "model.embed_tokens");

        var moe = isMoe
            ? new MoeFacts(experts, topK, 1, 1, inter, Enumerable.Range(0, (int)layers).ToList(), [],
                $"product-key retrieval: top-{keys} of each of 2 key sets of {keys}, top-{topK} of their sums, softmax" +
                (c.Bool("norm_topk_prob", false) ? ", renormalised" : "") + "; each expert is one neuron (down_embed/up_embed rows), plus a shared gated MLP")
            : MoeFacts.Dense(layers);
        var spec = Blocks.Spec(c, "doge", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);
        if (isMoe)
        {
            return spec with
            {
                RuntimeUnavailable = "transformers 5.17's Doge with is_moe does not run: its decoder layer passes the CDMoE's (states, router logits) tuple to dropout",
                TransformersForwardFails = "transformers 5.17 builds Doge with is_moe but cannot run it: DogeDecoderLayer passes DogeCDMoE's " +
                    "(hidden_states, router_logits) tuple to F.dropout (a TypeError). The counts here are those of the model it builds.",
            };
        }

        // Dense Doge: pre-norm layers whose residuals are scaled by learned vectors, dynamic-mask attention, DogeMLP.
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6));
        var window = c.IntOrNull("sliding_window", null);
        var attn = new DynamicMaskAttentionSettings(heads, kv, headDim, attnBias, norm.Eps,
            window is { } w ? new MaskSettings(MaskKind.Sliding, w) : MaskSettings.Full, c.Positive("keep_window_size", 2048));
        var form = new LayerForm(["input_layernorm", "self_attn", "post_attention_layernorm", "mlp"],
            new NamedNorm("input_layernorm", norm), null, new NamedNorm("post_attention_layernorm", norm), null,
            ResidualScales: ("input_residual", "post_attention_residual"));
        var layer = new DecoderLayerRuntime(attn, "mlp", new GatedMlpSettings(inter, act, mlpBias), norm, norm, form);
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, RopeSettings.Read(c, 10000.0, headDim),
                Enumerable.Repeat(layer, (int)layers).ToList()),
        };
    }
}
