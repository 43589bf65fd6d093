using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// JetMoE (<c>jetmoe</c>): every layer has two mixtures of experts routed alike (top-<c>num_experts_per_tok</c> of
/// <c>num_local_experts</c>, softmax over the selected logits, each with its own JetMoeTopKGating router whose
/// <c>layer</c> is an nn.Linear):
/// <list type="bullet">
/// <item><c>mlp</c> (JetMoeMoE): experts as JetMoeParallelExperts holding one 3-D weight each, input_linear
/// [E, 2·I, H] (gate | up) and output_linear [E, H, I], plus an output bias [H];</item>
/// <item><c>self_attention.experts</c> (JetMoeMoA, mixture of attention heads): per-expert query projection
/// input_linear [E, kv_channels·kv_heads, H] and output projection output_linear [E, H, kv_channels·kv_heads], plus
/// an output bias [H]; keys and values come from one shared kv_proj.</item>
/// </list>
/// The parallel-experts modules are not nn.Linear, so PEFT reaches them only through <c>target_parameters</c>
/// (<c>input_linear.weight</c>, <c>output_linear.weight</c>); all-linear finds just kv_proj and the router layers.
/// <c>num_attention_heads</c> is derived: <c>num_key_value_heads · num_experts_per_tok</c>.
/// <para>
/// transformers 5.17 registers mlp, the two norms, then self_attention. Checkpoints of 4.57 and 5.17 have the same
/// names (no conversion mapping), so Layout.V4 is that on-disk layout and builds the v5 tree; 4.57's module order
/// (JetMoeBlock) is not modelled.
/// </para>
/// <para>
/// Runtime: checked against transformers 5.17 (logits, hidden states, router logits with a left-padded row). Its
/// router logits are three per layer, as transformers records them: the attention gating's, the same tensor again as
/// JetMoeAttention's third output, then the MoE gating's.
/// </para>
/// </summary>
internal sealed class JetMoeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["jetmoe"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        const string p = "JetMoe";
        // Defaults: JetMoeConfig (head_dim is an alias of kv_channels).
        var vocab = c.Positive("vocab_size", 32000);
        var hidden = c.Positive("hidden_size", 2048);
        var inter = c.Positive("intermediate_size", 5632);
        var layers = c.Positive("num_hidden_layers", 12);
        var kv = c.Positive("num_key_value_heads", 16);
        var kvChannels = c.FirstInt("kv_channels", "head_dim") ?? 128;
        var experts = c.Positive("num_local_experts", 8);
        var topK = c.Positive("num_experts_per_tok", 2);
        if (topK > experts)
            throw new ConfigException($"config field 'num_experts_per_tok' ({topK}) must not exceed num_local_experts ({experts})");
        var heads = kv * topK;
        var tie = c.Bool("tie_word_embeddings", true);
        var act = c.String("activation_function", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var attnWidth = kvChannels * kv;

        var b = new TreeBuilder(p + "ForCausalLM", layout);
        Blocks.CausalLm(b, p, vocab, hidden, layers, tie, _ =>
        {
            using (b.Scope("mlp", p + "MoE", ModuleLocation.Other))
            {
                b.Param("bias", hidden);
                b.Leaf("activation", actClass);
                ParallelExperts(b, "input_linear", experts, hidden, 2 * inter, ModuleLocation.RoutedExpert);
                ParallelExperts(b, "output_linear", experts, inter, hidden, ModuleLocation.RoutedExpert);
                Gating(b, experts, hidden);
            }
            b.RmsNorm("input_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
            using (b.Scope("self_attention", p + "Attention", ModuleLocation.Attention))
            {
                using (b.Scope("experts", p + "MoA"))
                {
                    b.Param("bias", hidden);
                    ParallelExperts(b, "input_linear", experts, hidden, attnWidth, ModuleLocation.Attention);
                    ParallelExperts(b, "output_linear", experts, attnWidth, hidden, ModuleLocation.Attention);
                    Gating(b, experts, hidden);
                }
                b.Linear("kv_proj", hidden, 2 * attnWidth);
            }
        });

        var all = Enumerable.Range(0, (int)layers).ToList();
        var moe = new MoeFacts(experts, topK, 0, inter, 0, all, [],
            $"top-{topK} of {experts} router logits, softmax over the selected; attention is a mixture of {experts} " +
            $"attention experts too (self_attention.experts: per-expert query and output projections, routed the same way " +
            $"by their own router; one shared kv_proj)");
        return Blocks.Spec(c, "jetmoe", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            Runtime = Runtime(c, vocab, hidden, layers, kv, kvChannels, experts, topK, inter, act, tie),
        };
    }

    /// <summary>
    /// Pre-norm layers registered mlp, input_layernorm, post_attention_layernorm, self_attention. The layer norms are
    /// built as <c>JetMoeRMSNorm(hidden_size)</c>, so they keep the class default eps 1e-6; only the final norm reads
    /// <c>rms_norm_eps</c>. Both gatings take top-k of the fp32 logits and softmax those k (JetMoeTopKGating).
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig c, long vocab, long hidden, long layers, long kv, long kvChannels,
        long experts, long topK, long inter, string act, bool tie)
    {
        var layerNorm = new NormSettings(NormKind.Rms, 1e-6);
        var router = new TopKLogitsRouterSettings("router.layer", experts, topK, TopKScore.SoftmaxFp32, NormTopK: false,
            LogitsInFp32: true, LinearModule: true);
        var attn = new MixtureOfAttentionHeadsSettings(router, kv, kvChannels);
        var moe = new ParallelExpertsMoeSettings(router, inter, act);
        var form = new LayerForm(["mlp", "input_layernorm", "post_attention_layernorm", "self_attention"],
            new NamedNorm("input_layernorm", layerNorm), null, new NamedNorm("post_attention_layernorm", layerNorm), null,
            AttentionName: "self_attention");
        var all = Enumerable.Range(0, (int)layers).Select(_ => new DecoderLayerRuntime(attn, "mlp", moe, layerNorm, layerNorm, form)).ToList();
        // The rotary table spans head_dim, an alias of kv_channels.
        return new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.01),
            new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6)), RopeSettings.Read(c, 10000.0, kvChannels), all);
    }

    /// <summary>JetMoeParallelExperts: one weight [E, out, in], applied per expert as F.linear.</summary>
    private static void ParallelExperts(TreeBuilder b, string name, long experts, long inFeatures, long outFeatures,
        ModuleLocation location)
    {
        using (b.Scope(name, "JetMoeParallelExperts", location, kind: ModuleKind.Experts, numExperts: experts))
            b.Param("weight", experts, outFeatures, inFeatures);
    }

    private static void Gating(TreeBuilder b, long experts, long hidden)
    {
        using (b.Scope("router", "JetMoeTopKGating", ModuleLocation.Router))
            b.Linear("layer", hidden, experts);
    }
}
