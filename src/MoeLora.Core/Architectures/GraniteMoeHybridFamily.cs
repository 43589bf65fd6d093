using System.Text.Json.Nodes;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Granite 4 hybrid (<c>granitemoehybrid</c>): GraniteMoeShared's MoE block and shared MLP with a Mamba-2 mixer or an
/// attention block per layer (<c>layer_types</c>: "linear_attention" / legacy "mamba" is Mamba, anything else
/// attention; the default is all Mamba). Each decoder layer registers input_layernorm, post_attention_layernorm, the
/// MoE block (only when <c>num_local_experts</c> &gt; 0), the always-present <c>shared_mlp</c>, then the mixer.
/// <para>
/// The Mamba-2 mixer owns dt_bias, A_log and D [mamba_n_heads] (first in named_parameters), then a depthwise Conv1d
/// over conv_dim = Di + 2·groups·d_state, in_proj to Di + conv_dim + heads, a gated RMSNorm over Di and out_proj
/// (Di = mamba_expand·H). head_dim is read from the config when set, else hidden / heads; there is a rotary module
/// only when <c>position_embedding_type</c> is "rope".
/// </para>
/// <para>
/// v4 (4.57, same as the checkpoint): the MoE block holds <c>input_linear.weight</c> [E, 2I, H],
/// <c>output_linear.weight</c> [E, H, I] and <c>router.layer.weight</c> [E, H], as GraniteMoe's.
/// </para>
/// </summary>
internal sealed class GraniteMoeHybridFamily : IArchitecture
{
    private const string P = "GraniteMoeHybrid";

    public IReadOnlyList<string> ModelTypes => ["granitemoehybrid"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: GraniteMoeHybridConfig.
        var vocab = c.Positive("vocab_size", 32000);
        var hidden = c.Positive("hidden_size", 4096);
        var inter = c.Positive("intermediate_size", 11008);
        var layers = c.Positive("num_hidden_layers", 32);
        var heads = c.Positive("num_attention_heads", 32);
        var kv = c.IntOrNull("num_key_value_heads", null) ?? heads;
        var headDim = Blocks.HeadDim(c, hidden, heads);
        var experts = c.IntOrNull("num_local_experts", 8) ?? 0;
        var topK = c.IntOrNull("num_experts_per_tok", 2) ?? 0;
        var sharedInter = c.Int("shared_intermediate_size", 1024);
        var bias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var rope = c.String("position_embedding_type") == "rope";

        var mHeads = c.Positive("mamba_n_heads", 128);
        var groups = c.Positive("mamba_n_groups", 1);
        var dState = c.Positive("mamba_d_state", 256);
        var dConv = c.Positive("mamba_d_conv", 4);
        var expand = c.Positive("mamba_expand", 2);
        var convBias = c.Bool("mamba_conv_bias", true);
        var projBias = c.Bool("mamba_proj_bias", false);
        var inner = expand * hidden;
        // GraniteMoeHybridConfig.validate_architecture.
        if (inner % mHeads != 0) throw new ConfigException($"mamba_n_heads ({mHeads}) must divide mamba_expand * hidden_size ({inner})");
        if (MambaHeadDim(c, inner, mHeads) * mHeads != inner)
            throw new ConfigException("mamba_d_head * mamba_n_heads must equal mamba_expand * hidden_size");
        var convDim = inner + 2 * groups * dState;

        var layerTypes = c.StringList("layer_types") ?? Enumerable.Repeat("linear_attention", (int)layers).ToList();
        if (layerTypes.Count < layers)
            throw new ConfigException($"config field 'layer_types' has {layerTypes.Count} entries for {layers} layers");
        var hasMoe = experts > 0;

        var b = new TreeBuilder(P + "ForCausalLM", layout);
        using (b.Scope("model", P + "Model"))
        {
            b.Embedding("embed_tokens", vocab, hidden);
            b.ModuleList("layers", layers, i =>
            {
                using (b.Scope(i.ToString(System.Globalization.CultureInfo.InvariantCulture), P + "DecoderLayer", ModuleLocation.Other, layer: i))
                {
                    b.RmsNorm("input_layernorm", P + "RMSNorm", hidden, ModuleLocation.Norm);
                    b.RmsNorm("post_attention_layernorm", P + "RMSNorm", hidden, ModuleLocation.Norm);
                    if (hasMoe) MoeBlock(b, layout, experts, hidden, inter, actClass);
                    using (b.Scope("shared_mlp", P + "MLP", ModuleLocation.SharedExpert))
                    {
                        b.Leaf("activation", actClass);
                        b.Linear("input_linear", hidden, 2 * sharedInter);
                        b.Linear("output_linear", sharedInter, hidden);
                    }
                    // remap_legacy_layer_types: "mamba" is the legacy name of "linear_attention".
                    if (layerTypes[i] is "linear_attention" or "mamba")
                        Mamba(b, hidden, inner, mHeads, convDim, dConv, convBias, projBias, actClass);
                    else
                        Blocks.Attention(b, P + "Attention", hidden, heads, kv, headDim, bias, bias);
                }
            });
            b.RmsNorm("norm", P + "RMSNorm", hidden, ModuleLocation.Norm);
            if (rope) b.Leaf("rotary_emb", P + "RotaryEmbedding");
        }
        b.Linear("lm_head", hidden, vocab, location: ModuleLocation.LmHead, tiedWeightTo: tie ? "model.embed_tokens.weight" : null);

        var all = Enumerable.Range(0, (int)layers).ToList();
        var moe = hasMoe
            ? new MoeFacts(experts, topK, 1, inter, sharedInter, all, [],
                $"top-{topK} of {experts} router logits, softmax over the selected, plus an always-on shared MLP")
            : MoeFacts.Dense(layers);
        var spec = Blocks.Spec(c, "granitemoehybrid", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);
        if (Blocks.TimeStepLimit(c) is not { } limit)
            return spec with { RuntimeUnavailable = "a time_step_limit that is not a pair of numbers (transformers' torch path clamps dt to it)" };
        var mamba = new Mamba2MixerSettings(mHeads, MambaHeadDim(c, inner, mHeads), dState, groups, dConv, convBias, projBias, act,
            c.Double("rms_norm_eps", 1e-6), NormGroupSize: inner, limit, MaskBatchedOnly: true, c.Positive("mamba_chunk_size", 256), InitialDt: null);
        return spec with { Runtime = Runtime(c, layerTypes, layers, hidden, heads, kv, headDim, bias, experts, topK, inter, sharedInter, act, vocab, tie, rope, mamba) };
    }

    /// <summary>
    /// GraniteMoeShared's layer (pre-norm, both residual branches × residual_multiplier, the MoE output plus the shared
    /// MLP, or the shared MLP alone without experts; embeddings × embedding_multiplier, logits ÷ logits_scaling,
    /// softmax scale attention_multiplier) whose mixer is the Mamba-2 layer (<c>mamba</c>) or attention
    /// (<c>self_attn</c>, rotated only when position_embedding_type is "rope"). The Mamba-2 math is Nemotron-H's
    /// (checked on its fixture) with Granite's dt clamp to time_step_limit, one RMS over the whole gated width and
    /// padding zeroed only for batches of several rows; no transformers reference of this type checks it yet.
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig c, IReadOnlyList<string> layerTypes, long layers, long hidden, long heads, long kv,
        long headDim, bool bias, long experts, long topK, long inter, long sharedInter, string act, long vocab, bool tie, bool rope,
        Mamba2MixerSettings mamba)
    {
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6));
        double residual = c.Double("residual_multiplier", 1.0);
        var attention = new StandardAttentionSettings(heads, kv, headDim, bias, bias, QkNormKind.None, 0, Sinks: false, MaskSettings.Full, headDim,
            new StandardAttentionOptions(Scaling: c.Double("attention_multiplier", 1.0), Rotary: rope ? RotaryStyle.Half : RotaryStyle.None));
        var shared = new FusedGateUpMlpSettings(sharedInter, act, "input_linear", "output_linear", "activation");
        var moe = experts > 0
            ? new MoeSettings(new TopKLogitsRouterSettings("router", experts, topK, TopKScore.SoftmaxFp32, NormTopK: false, LogitsInFp32: true),
                new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, inter, act), Shared: null, MoeOrder.RouterFirst)
            : null;
        var list = new List<DecoderLayerRuntime>();
        for (int i = 0; i < layers; i++)
        {
            var mixer = layerTypes[i] is "linear_attention" or "mamba" ? "mamba" : "self_attn";
            List<string> order = ["input_layernorm", "post_attention_layernorm"];
            if (moe is not null) order.Add("block_sparse_moe");
            order.AddRange(["shared_mlp", mixer]);
            var form = new LayerForm(order, new NamedNorm("input_layernorm", norm), null, new NamedNorm("post_attention_layernorm", norm), null,
                ResidualMultiplier: residual, ExtraFeedForward: moe is null ? null : shared, ExtraFeedForwardName: moe is null ? null : "shared_mlp",
                AttentionName: mixer);
            list.Add(new DecoderLayerRuntime(mixer == "mamba" ? mamba : attention, moe is null ? "shared_mlp" : "block_sparse_moe",
                (FeedForwardSettings?)moe ?? shared, norm, norm, form));
        }
        var scaling = new ModelScaling(EmbeddingMultiplier: c.Double("embedding_multiplier", 1.0), LogitsMultiplier: 1.0 / c.Double("logits_scaling", 1.0));
        return new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, RopeSettings.Read(c, 10000.0, headDim), list,
            Scaling: scaling, Names: rope ? null : new ModelNames("embed_tokens", "norm", Rotary: null));
    }

    private static void MoeBlock(TreeBuilder b, Layout layout, long experts, long hidden, long inter, string actClass)
    {
        using (b.Scope("block_sparse_moe", P + "MoE", ModuleLocation.Other))
        {
            if (layout == Layout.V5)
            {
                Blocks.TopKRouter(b, "router", P + "TopKRouter", experts, hidden);
                Blocks.FusedExperts(b, P + "Experts", experts, hidden, inter, actClass);
                return;
            }
            b.Leaf("activation", actClass);
            // ParallelExperts hold one 3-D weight each, (out, in) per expert; first half of input_linear = gate.
            using (b.Scope("input_linear", P + "ParallelExperts", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts, numExperts: experts))
                b.Param("weight", experts, 2 * inter, hidden);
            using (b.Scope("output_linear", P + "ParallelExperts", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts, numExperts: experts))
                b.Param("weight", experts, hidden, inter);
            using (b.Scope("router", P + "TopKGating", ModuleLocation.Router))
                b.Linear("layer", hidden, experts);
        }
    }

    /// <summary>GraniteMoeHybridMambaLayer, counted as the layer's sequence mixer (ModuleLocation.Attention).</summary>
    private static void Mamba(TreeBuilder b, long hidden, long inner, long heads, long convDim, long dConv, bool convBias,
        bool projBias, string actClass)
    {
        using (b.Scope("mamba", P + "MambaLayer", ModuleLocation.Attention))
        {
            b.Param("dt_bias", heads);
            b.Param("A_log", heads);
            b.Param("D", heads);
            b.Leaf("act", actClass);
            using (b.Scope("conv1d", "Conv1d", kind: ModuleKind.Other))
            {
                b.Param("weight", convDim, 1, dConv);
                if (convBias) b.Param("bias", convDim);
            }
            b.Linear("in_proj", hidden, inner + convDim + heads, projBias);
            b.RmsNorm("norm", P + "RMSNormGated", inner);
            b.Linear("out_proj", inner, hidden, projBias);
        }
    }

    /// <summary><c>mamba_d_head</c>: an integer, or "auto" (the default) for Di / mamba_n_heads.</summary>
    private static long MambaHeadDim(ModelConfig c, long inner, long heads)
    {
        if (!c.Json.TryGetPropertyValue("mamba_d_head", out var v) || v is null) return inner / heads;
        if (v is JsonValue jv && jv.TryGetValue<string>(out var s))
        {
            if (s == "auto") return inner / heads;
            throw new ConfigException($"config field 'mamba_d_head' must be an integer or \"auto\", got \"{s}\"");
        }
        return c.Positive("mamba_d_head", inner / heads);
    }
}
