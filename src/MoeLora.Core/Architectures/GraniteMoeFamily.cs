using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Util;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Granite MoE (<c>granitemoe</c>) and Granite MoE with a shared MLP (<c>granitemoeshared</c>). Every layer is MoE
/// under <c>block_sparse_moe</c>; experts of <c>intermediate_size</c> were already fused 3-D tensors in v4
/// (GraniteMoeParallelExperts), so the v4 tree has no per-expert nn.Linear. head_dim is always hidden / heads.
/// granitemoeshared adds <c>shared_mlp</c> (input_linear [2·Is, H], output_linear [H, Is]) when
/// <c>shared_intermediate_size</c> &gt; 0. The Granite scalar multipliers have no parameters.
/// <para>
/// transformers 5.17 registers the norms before the MoE block (self_attn, input_layernorm, post_attention_layernorm,
/// block_sparse_moe) and uses a TopK router (not an nn.Linear) plus the standard fused experts; 4.57 registered
/// self_attn, block_sparse_moe, the norms, and named the tensors input_linear / output_linear / router.layer
/// (transformers-moe-layouts §4.11).
/// </para>
/// <para>
/// <c>granitemoe_swa</c> (GraniteMoeShared with sliding-window layers, new in transformers 5, so Layout.V4 means
/// the on-disk checkpoint layout, which is the v5 tree: no conversion mapping) adds a learnable per-head attention
/// sink (<c>self_attn.sinks</c>), reads <c>head_dim</c> when a config sets it, and registers after
/// <c>rotary_emb</c> a <c>rotary_embs</c> ModuleList with one rotary embedding per distinct non-zero
/// <c>layer_rope_theta</c> (default: every layer at the rope theta).
/// </para>
/// </summary>
internal sealed class GraniteMoeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["granitemoe", "granitemoeshared", "granitemoe_swa"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var type = c.ModelType!;
        var swa = type == "granitemoe_swa";
        var p = type switch { "granitemoeshared" => "GraniteMoeShared", "granitemoe_swa" => "GraniteMoeSWA", _ => "GraniteMoe" };
        // Defaults: GraniteMoeConfig / GraniteMoeSharedConfig / GraniteMoeSWAConfig.
        var vocab = c.Positive("vocab_size", 32000);
        var hidden = c.Positive("hidden_size", 4096);
        var inter = c.Positive("intermediate_size", 11008);
        var layers = c.Positive("num_hidden_layers", 32);
        var heads = c.Positive("num_attention_heads", 32);
        var kv = c.IntOrNull("num_key_value_heads", null) ?? heads;
        // GraniteMoeAttention: head_dim = hidden_size // num_attention_heads (config.head_dim is not read);
        // GraniteMoeSWAAttention: getattr(config, "head_dim", hidden_size // num_attention_heads).
        var headDim = swa ? Blocks.HeadDim(c, hidden, heads) : hidden / heads;
        var experts = c.Positive("num_local_experts", 8);
        var topK = c.Positive("num_experts_per_tok", 2);
        var bias = c.Bool("attention_bias", false);
        var sharedInter = type != "granitemoe" ? c.Int("shared_intermediate_size", 0) : 0;
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        var b = new TreeBuilder(p + "ForCausalLM", layout);
        Blocks.CausalLm(b, p, vocab, hidden, layers, tie, _ =>
        {
            Blocks.Attention(b, p + "Attention", hidden, heads, kv, headDim, bias, bias,
                beforeProjections: swa ? bb => bb.Param("sinks", heads) : null);
            if (layout == Layout.V5 || swa)
            {
                Norms(b, p, hidden);
                using (b.Scope("block_sparse_moe", p + "MoE", ModuleLocation.Other))
                {
                    Blocks.TopKRouter(b, "router", p + "TopKRouter", experts, hidden);
                    Blocks.FusedExperts(b, p + "Experts", experts, hidden, inter, actClass);
                }
            }
            else
            {
                using (b.Scope("block_sparse_moe", p + "MoE", ModuleLocation.Other))
                {
                    b.Leaf("activation", actClass);
                    // ParallelExperts hold one 3-D weight each, (out, in) per expert; first half of input_linear = gate.
                    using (b.Scope("input_linear", p + "ParallelExperts", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts, numExperts: experts))
                        b.Param("weight", experts, 2 * inter, hidden);
                    using (b.Scope("output_linear", p + "ParallelExperts", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts, numExperts: experts))
                        b.Param("weight", experts, hidden, inter);
                    using (b.Scope("router", p + "TopKGating", ModuleLocation.Router))
                        b.Linear("layer", hidden, experts);
                }
                Norms(b, p, hidden);
            }
            if (sharedInter > 0)
            {
                using (b.Scope("shared_mlp", p + "MLP", ModuleLocation.SharedExpert))
                {
                    b.Leaf("activation", actClass);
                    b.Linear("input_linear", hidden, 2 * sharedInter);
                    b.Linear("output_linear", sharedInter, hidden);
                }
            }
        }, modelTail: swa
            ? () => b.ModuleList("rotary_embs", DistinctRopeThetas(c),
                i => b.Leaf(i.ToString(System.Globalization.CultureInfo.InvariantCulture), p + "RotaryEmbedding"))
            : null);

        var all = Enumerable.Range(0, (int)layers).ToList();
        var moe = new MoeFacts(experts, topK, sharedInter > 0 ? 1 : 0, inter, sharedInter, all, [],
            $"top-{topK} of {experts} router logits, softmax over the selected");
        var spec = Blocks.Spec(c, type, b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);
        return spec with { Runtime = Runtime(c, swa, hidden, layers, heads, kv, headDim, bias, experts, topK, inter, sharedInter, act, vocab, tie) };
    }

    /// <summary>
    /// Mixtral's pre-norm layer with Granite's scalars: embeddings × embedding_multiplier, attention scale
    /// attention_multiplier (not head_dim^-0.5), both residual branches × residual_multiplier, logits ÷ logits_scaling;
    /// the router takes top-k of the fp32 logits and softmaxes those k. The shared MLP (input_linear = gate‖up,
    /// output_linear) is added to the MoE output. SWA: per-layer sliding windows, sinks as a sigmoid(lse − sink)
    /// output scale (the same as a sink column in the softmax), and each layer's rope theta (0: no rope).
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig c, bool swa, long hidden, long layers, long heads, long kv, long headDim, bool bias,
        long experts, long topK, long inter, long sharedInter, string act, long vocab, bool tie)
    {
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6));
        var rope = RopeSettings.Read(c, 10000.0, headDim);
        double residual = c.Double("residual_multiplier", 1.0), attnScale = c.Double("attention_multiplier", 1.0);
        var layerTypes = swa ? c.StringList("layer_types") ?? Enumerable.Range(0, (int)layers).Select(i => i % 4 == 0 ? "full_attention" : "sliding_attention").ToList() : null;
        var thetas = swa && c.Json["layer_rope_theta"] is System.Text.Json.Nodes.JsonArray list
            ? list.Select(x => x is not null && JsonNumbers.TryDouble(x, out var d) ? d : throw new ConfigException("config field 'layer_rope_theta' must be a list of numbers")).ToList()
            : null;
        if (layerTypes is not null && layerTypes.Count < layers) throw new ConfigException($"config field 'layer_types' has {layerTypes.Count} entries but num_hidden_layers is {layers}");
        if (thetas is not null && thetas.Count < layers) throw new ConfigException($"config field 'layer_rope_theta' has {thetas.Count} entries but num_hidden_layers is {layers}");
        var moe = new MoeSettings(new TopKLogitsRouterSettings("router", experts, topK, TopKScore.SoftmaxFp32, NormTopK: false, LogitsInFp32: true),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, inter, act), Shared: null, MoeOrder.RouterFirst);
        var shared = sharedInter > 0 ? new FusedGateUpMlpSettings(sharedInter, act, "input_linear", "output_linear", "activation") : null;
        List<string> order = ["self_attn", "input_layernorm", "post_attention_layernorm", "block_sparse_moe"];
        if (shared is not null) order.Add("shared_mlp");
        var form = new LayerForm(order, new NamedNorm("input_layernorm", norm), null, new NamedNorm("post_attention_layernorm", norm), null,
            ResidualMultiplier: residual, ExtraFeedForward: shared, ExtraFeedForwardName: shared is null ? null : "shared_mlp");
        var all = new List<DecoderLayerRuntime>();
        for (int i = 0; i < layers; i++)
        {
            var sliding = layerTypes is not null && layerTypes[i] == "sliding_attention";
            var theta = thetas?[i];
            var options = new StandardAttentionOptions(Scaling: attnScale, Rotary: theta is null || theta != 0 ? RotaryStyle.Half : RotaryStyle.None,
                Rope: theta is { } t && t != 0 && t != rope.Theta ? rope with { Theta = t } : null);
            var mask = sliding ? new MaskSettings(MaskKind.Sliding, c.Positive("sliding_window", 128)) : MaskSettings.Full;
            var attn = new StandardAttentionSettings(heads, kv, headDim, bias, bias, QkNormKind.None, 0, Sinks: swa, mask, headDim, options);
            all.Add(new DecoderLayerRuntime(attn, "block_sparse_moe", moe, norm, norm, form));
        }
        var scaling = new ModelScaling(EmbeddingMultiplier: c.Double("embedding_multiplier", 1.0), LogitsMultiplier: 1.0 / c.Double("logits_scaling", 1.0));
        return new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, rope, all, Scaling: scaling);
    }

    /// <summary>How many distinct non-zero <c>layer_rope_theta</c> values there are (0 marks a NoPE layer).</summary>
    private static int DistinctRopeThetas(ModelConfig c)
    {
        if (!c.Json.TryGetPropertyValue("layer_rope_theta", out var node) || node is null)
        {
            // Default: every layer at rope_parameters.rope_theta (10000 unless set).
            var theta = c.Sub("rope_parameters")?.Double("rope_theta", 10000.0) ?? c.Double("rope_theta", 10000.0);
            return theta != 0 ? 1 : 0;
        }
        if (node is not System.Text.Json.Nodes.JsonArray list)
            throw new ConfigException($"config field 'layer_rope_theta' must be a list of numbers, got {node.ToJsonString()}");
        return list.Select(x => x is not null && JsonNumbers.TryDouble(x, out var d) ? d
                : throw new ConfigException("config field 'layer_rope_theta' must be a list of numbers"))
            .Where(d => d != 0).Distinct().Count();
    }

    private static void Norms(TreeBuilder b, string p, long hidden)
    {
        b.RmsNorm("input_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
        b.RmsNorm("post_attention_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
    }
}
