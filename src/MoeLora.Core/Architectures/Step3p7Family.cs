using System.Globalization;
using System.Text.Json.Nodes;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Util;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Step-3.7 (<c>step3p7</c>, <c>Step3p7ForConditionalGeneration</c>, new in transformers 5; no causal-LM head):
/// model.vision_model, model.language_model (text config type <c>step3p5</c>), model.multi_modal_projector, lm_head.
/// <para>
/// Text layers: attention with per-head q/k RMSNorms and a per-head sigmoid output gate <c>g_proj</c> [heads, hidden];
/// a layer's head count is its <c>per_layer_config</c> entry, else <c>num_sliding_attention_heads</c> on
/// <c>sliding_attention</c> layers of <c>layer_types</c>, else <c>num_attention_heads</c>. <c>mlp_layer_types</c>
/// (default: layers from 3 on sparse, or the legacy <c>moe_layers_enum</c>) picks a dense MLP of
/// <c>intermediate_size</c> or the MoE block: a TopK router with a persistent <c>e_score_correction_bias</c> buffer,
/// fused experts of <c>moe_intermediate_size</c>, and a shared MLP of <c>share_expert_dim</c>. Legacy configs pad the
/// per-layer lists with <c>num_nextn_predict_layers</c> MTP entries, which transformers splits off.
/// </para>
/// <para>
/// Vision tower: SigLIP-style embeddings (a Conv2d patch embedding without bias, one position per patch), a
/// pre-LayerNorm, encoder layers with layer scales (<c>lambda_1/2</c>), attention and an MLP of
/// <c>int(hidden_size · mlp_ratio)</c> (the config recomputes <c>intermediate_size</c> so), then two stride-2 Conv2d
/// downsamplers doubling the width each; the projector maps 4 · the vision width to the text width.
/// </para>
/// <para>
/// Layout.V4 is the checkpoint layout transformers converts from: the language model at <c>model.*</c> with
/// <c>moe.gate</c>, <c>moe.router_bias</c> (the router's buffer), experts split into <c>moe.gate_proj/up_proj</c>
/// [E, I, H] and <c>moe.down_proj</c> [E, H, I], <c>share_expert</c>; the vision tower at <c>vision_model.*</c> in
/// OpenCLIP names (conv1, positional_embedding, ln_pre, transformer.resblocks.N with a fused attn.in_proj_weight,
/// ln_1/ln_2, ls_1/ls_2.gamma, mlp.c_fc/c_proj, vit_downsampler1/2); the projector as <c>vit_large_projector</c>.
/// Containers that exist only on disk are plain Modules. Loading converts it as transformers does: the stacked
/// gate/up weights joined along dimension 1, and in_proj chunked into q, k, v with q and k rope-permuted over the vision
/// heads (<see cref="ModelSpec.InProjRopeHeads"/>).
/// </para>
/// <para>
/// The runtime runs the v5 model on text only (the vision tower and projector built inert); configs it cannot
/// reproduce (per-element gating, bidirectional attention, MLP biases) are refused in one line.
/// </para>
/// </summary>
internal sealed class Step3p7Family : IArchitecture
{
    private const string P = "Step3p7";

    public IReadOnlyList<string> ModelTypes => ["step3p7"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var disk = layout == Layout.V4;
        var text = Blocks.SubOrDefaults(c, "text_config");
        var t = TextDims.Read(text, layout);
        var v = VisionDims.Read(Blocks.SubOrDefaults(c, "vision_config"), layout);
        var tie = c.Has("tie_word_embeddings") ? c.Bool("tie_word_embeddings", false) : t.Tie;
        var projectorBias = c.Bool("projector_bias", false);

        var (layerTypes, mlpTypes) = LayerTypes(text, t.Layers);
        var (moeLayers, denseLayers) = Blocks.SplitLayers(t.Layers, i => mlpTypes[i] == "sparse");
        var slidingHeads = text.IntOrNull("num_sliding_attention_heads", null)
            ?? text.Sub("attention_other_setting")?.IntOrNull("num_attention_heads", null) ?? t.Heads;
        long HeadsOf(int i) =>
            text.Sub("per_layer_config")?.Sub(i.ToString(CultureInfo.InvariantCulture))?.IntOrNull("num_attention_heads", null)
            ?? (layerTypes[i] == "sliding_attention" ? slidingHeads : t.Heads);

        var b = new TreeBuilder(P + "ForConditionalGeneration", layout);
        void Layer(int i)
        {
            var heads = HeadsOf(i);
            Blocks.Attention(b, P + "Attention", t.Hidden, heads, t.Kv, t.HeadDim, t.AttentionBias, t.AttentionBias, afterProjections: bb =>
            {
                bb.RmsNorm("q_norm", P + "RMSNorm", t.HeadDim);
                bb.RmsNorm("k_norm", P + "RMSNorm", t.HeadDim);
                bb.Linear("g_proj", t.Hidden, heads);
            });
            if (mlpTypes[i] == "sparse") Moe(b, t, disk);
            else Blocks.GatedMlp(b, "mlp", P + "MLP", t.Hidden, t.Inter, false, t.ActClass, ModuleLocation.Mlp);
            b.RmsNorm("input_layernorm", P + "RMSNorm", t.Hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", P + "RMSNorm", t.Hidden, ModuleLocation.Norm);
        }

        string textModel;
        if (!disk)
        {
            using (b.Scope("model", P + "Model"))
            {
                VisionModel(b, v);
                Blocks.DecoderStack(b, "language_model", P + "TextModel", P + "DecoderLayer", P + "RMSNorm", P + "RotaryEmbedding",
                    t.Vocab, t.Hidden, t.Layers, Layer);
                b.Linear("multi_modal_projector", 4 * v.Hidden, t.Hidden, projectorBias, location: ModuleLocation.Projector);
            }
            textModel = "model.language_model";
        }
        else
        {
            using (b.Scope("model", "Module"))
            {
                b.Embedding("embed_tokens", t.Vocab, t.Hidden);
                b.ModuleList("layers", t.Layers, i =>
                {
                    using (b.Scope(i.ToString(CultureInfo.InvariantCulture), P + "DecoderLayer", ModuleLocation.Other, layer: i))
                        Layer(i);
                });
                b.RmsNorm("norm", P + "RMSNorm", t.Hidden, ModuleLocation.Norm);
            }
            DiskVisionModel(b, v);
            b.Linear("vit_large_projector", 4 * v.Hidden, t.Hidden, projectorBias, location: ModuleLocation.Projector);
            textModel = "model";
        }
        Blocks.LmHead(b, t.Hidden, t.Vocab, tie, textModel + ".embed_tokens");

        var routing = $"sigmoid of {t.Experts} router logits; top-{t.TopK} chosen on sigmoid + e_score_correction_bias, their " +
            $"sigmoids renormalised, scaled by moe_router_scaling_factor ({text.Double("moe_router_scaling_factor", 1.0)}), plus a shared expert";
        var moe = new MoeFacts(t.Experts, t.TopK, 1, t.MoeInter, t.SharedInter, moeLayers, denseLayers, routing);
        var spec = Blocks.NestedSpec(c, text, "step3p7", b.Build(), moe, t.Hidden, t.Layers, t.Vocab, t.Heads, t.Kv, tie, "silu",
            textModel) with
        {
            InProjRopeHeads = v.Heads,
        };
        if (disk) return spec with { RuntimeUnavailable = "the runtime builds the transformers-5 modules, not the checkpoint layout" };
        if (Unsupported(text, layerTypes) is { } why) return spec with { RuntimeUnavailable = why };
        // A text-only forward of Step3p7ForConditionalGeneration never calls the vision tower (no pixel_values): the tower
        // and the projector are built with their parameters but not run.
        return spec with
        {
            Runtime = TextRuntime(text, t, layerTypes, mlpTypes, HeadsOf) with
            {
                TieWordEmbeddings = tie,
                // Step3p7Model registers the text model between the vision tower and the projector.
                Towers = new InertTowers(["model.vision_model", "model.language_model", "model.multi_modal_projector", "lm_head"], "model.language_model", "lm_head"),
            },
        };
    }

    /// <summary>What the runtime does not reproduce of this config, in one line; null when it runs.</summary>
    private static string? Unsupported(ModelConfig text, IReadOnlyList<string> layerTypes)
    {
        // Step3p7Attention gates per head only when gating is True or "per-head" (the tree's g_proj has one row per head).
        if (text.Json["gating"] is { } gating && gating.ToJsonString() is not ("true" or "\"per-head\""))
            return "Step-3.7 attention gated per element (gating is neither true nor \"per-head\")";
        if (text.Bool("use_bidirectional_attention", false))
            return "Step-3.7's bidirectional attention (use_bidirectional_attention)";
        if (text.Bool("mlp_bias", false)) return "Step-3.7 MLPs with biases (mlp_bias)";
        // transformers' create_sliding_window_causal_mask fails without a window.
        if (layerTypes.Contains("sliding_attention") && text.IntOrNull("sliding_window", null) is null)
            return "Step-3.7 sliding_attention layers without a sliding_window";
        return null;
    }

    /// <summary>
    /// Step3p7TextModel: Gemma-style RMSNorms ((1 + weight) in fp32) around each sublayer and per head on q and k (before
    /// rope); softmax scale query_pre_attn_scalar^-0.5; the attention output times sigmoid(g_proj(x)) per head before
    /// o_proj; a sliding window on sliding_attention layers, each layer type with its own rope; a dense MLP or the MoE
    /// block (sigmoid router, selection on sigmoid + e_score_correction_bias, renormalised sigmoids, routed output ×
    /// moe_router_scaling_factor plus the shared expert). hidden_act is always SiLU (the config forces it); a layer's
    /// swiglu_limits / swiglu_limits_shared entry clamps SiLU(gate) to at most L and up to ±L (0 or null: no clamp).
    /// </summary>
    private static DecoderRuntime TextRuntime(ModelConfig text, TextDims t, IReadOnlyList<string> layerTypes, IReadOnlyList<string> mlpTypes,
        Func<int, long> headsOf)
    {
        var norm = new NormSettings(NormKind.RmsOnePlusWeight, text.Double("rms_norm_eps", 1e-5));
        var scaling = Math.Pow(text.Double("query_pre_attn_scalar", t.HeadDim), -0.5);
        var ropes = Ropes(text, layerTypes, t.HeadDim);
        var window = text.IntOrNull("sliding_window", null) ?? 0;
        var limits = Limits(text, "swiglu_limits", t.Layers);
        var sharedLimits = Limits(text, "swiglu_limits_shared", t.Layers);
        var router = new SigmoidBiasRouterSettings("gate", t.Experts, t.TopK, new ScoreBias("e_score_correction_bias", ScoreBiasOwner.Router, IsParameter: false),
            NormTopK: true, NormEps: 0, Scale: 1.0, SoftCap: 0);
        var options = new MoeOptions(RoutedScale: text.Double("moe_router_scaling_factor", 1.0));

        FeedForwardSettings FeedForward(int i)
        {
            if (mlpTypes[i] != "sparse")
                return new GatedMlpSettings(t.Inter, "silu", ClampLimit: sharedLimits[i], ClampAfterActivation: true);
            var experts = limits[i] is { } l
                ? new ExpertsSettings(ExpertsLayout.GateUpOutInClamped, t.Experts, t.MoeInter, "silu", l, SwigluAlpha: 1.0, SwigluUpShift: 0,
                    ClampAfterActivation: true)
                : new ExpertsSettings(ExpertsLayout.GateUpOutIn, t.Experts, t.MoeInter, "silu");
            var shared = new SharedExpertSettings("shared_experts", t.SharedInter, "silu", null, ClampLimit: sharedLimits[i], ClampAfterActivation: true);
            return new MoeSettings(router, experts, shared, MoeOrder.RouterFirst, options);
        }

        var layers = Enumerable.Range(0, (int)t.Layers).Select(i =>
        {
            var sliding = layerTypes[i] == "sliding_attention";
            var rope = ropes[layerTypes[i]];
            var attention = new StandardAttentionSettings(headsOf(i), t.Kv, t.HeadDim, t.AttentionBias, t.AttentionBias, QkNormKind.PerHead, norm.Eps,
                Sinks: false, sliding ? new MaskSettings(MaskKind.Sliding, window) : MaskSettings.Full, rope.Dim,
                new StandardAttentionOptions(Rope: rope, QkNormType: NormKind.RmsOnePlusWeight, Scaling: scaling,
                    Gate: new OutputGate("g_proj", OutputGateKind.Sigmoid, PerHead: true)));
            return new DecoderLayerRuntime(attention, "mlp", FeedForward(i), norm, norm);
        }).ToList();
        return new DecoderRuntime(t.Vocab, t.Hidden, t.Tie, text.Double("initializer_range", 0.02), norm, ropes[layerTypes[0]], layers);
    }

    /// <summary>
    /// Step3p7TextConfig's rope_parameters, one per layer type: as saved (a sub-dict per type), else built from rope_theta
    /// (one number, or one per layer: the type's first layer decides), partial_rotary_factors (per layer) and
    /// rope_scaling (merged into full_attention's). Each rotates int(head_dim · partial_rotary_factor) dims.
    /// </summary>
    private static Dictionary<string, RopeSettings> Ropes(ModelConfig text, IReadOnlyList<string> layerTypes, long headDim)
    {
        var saved = text.Sub("rope_parameters");
        var types = layerTypes.Distinct().ToList();
        var result = new Dictionary<string, RopeSettings>();
        if (saved is not null && types.All(k => saved.Sub(k) is not null))
        {
            foreach (var k in types)
            {
                var o = saved.Sub(k)!;
                result[k] = RopeSettings.Of(o, o.Double("rope_theta", 10000.0), (long)(headDim * o.Double("partial_rotary_factor", 1.0)));
            }
            return result;
        }
        var thetas = Numbers(text, "rope_theta");
        var factors = Numbers(text, "partial_rotary_factors");
        foreach (var k in types)
        {
            int first = layerTypes.ToList().IndexOf(k);
            var theta = thetas is null ? text.Double("rope_theta", 10000.0) : thetas[first];
            var factor = factors is null ? 1.0 : factors[first];
            var scaling = k == "full_attention" ? text.Sub("rope_scaling") : null;
            result[k] = scaling is null ? new RopeSettings("default", theta, (long)(headDim * factor))
                : RopeSettings.Of(scaling, scaling.Double("rope_theta", theta), (long)(headDim * factor));
        }
        return result;
    }

    /// <summary>A per-layer list of numbers (rope_theta, partial_rotary_factors); null when the field is absent or one number.</summary>
    private static IReadOnlyList<double>? Numbers(ModelConfig text, string name) =>
        text.Json[name] is JsonArray list
            ? list.Select(x => JsonNumbers.TryDouble(x, out var d) ? d : throw new ConfigException($"config field '{name}' must be a list of numbers")).ToList()
            : null;

    /// <summary>swiglu_limits / swiglu_limits_shared per layer: null (absent, null or 0) means no clamp.</summary>
    private static double?[] Limits(ModelConfig text, string name, long layers)
    {
        var result = new double?[layers];
        if (text.Json[name] is not JsonArray list) return result;
        for (int i = 0; i < layers && i < list.Count; i++)
            result[i] = list[i] is { } x && JsonNumbers.TryDouble(x, out var d) && d != 0 ? d : null;
        return result;
    }

    /// <summary>
    /// layer_types (default all full_attention) and mlp_layer_types (default: the legacy moe_layers_enum, else layers
    /// from 3 on sparse), with a legacy config's trailing MTP entries (num_nextn_predict_layers) split off.
    /// </summary>
    private static (IReadOnlyList<string> Attention, IReadOnlyList<string> Mlp) LayerTypes(ModelConfig text, long layers)
    {
        var padded = layers + text.Int("num_nextn_predict_layers", 0);
        IReadOnlyList<string>? Trim(IReadOnlyList<string>? list) =>
            list is not null && list.Count == padded ? list.Take((int)layers).ToList() : list;

        var attention = Trim(text.StringList("layer_types")) ?? Enumerable.Repeat("full_attention", (int)layers).ToList();
        var mlp = Trim(text.StringList("mlp_layer_types"));
        if (mlp is null)
        {
            var moeSet = MoeLayersEnum(text) ?? Enumerable.Range(3, (int)Math.Max(0, layers - 3)).ToHashSet();
            mlp = Enumerable.Range(0, (int)layers).Select(i => moeSet.Contains(i) ? "sparse" : "dense").ToList();
        }
        // validate_layer_type: one entry per layer.
        if (attention.Count != layers)
            throw new ConfigException($"config field 'layer_types' has {attention.Count} entries but num_hidden_layers is {layers}");
        if (mlp.Count != layers)
            throw new ConfigException($"config field 'mlp_layer_types' has {mlp.Count} entries but num_hidden_layers is {layers}");
        Blocks.CheckLayerTypes(attention, "layer_types", "full_attention", "sliding_attention");
        Blocks.CheckLayerTypes(mlp, "mlp_layer_types", "sparse", "dense");
        return (attention, mlp);
    }

    /// <summary>The legacy <c>moe_layers_enum</c>: MoE layer indices as a list or a comma-separated string.</summary>
    private static HashSet<int>? MoeLayersEnum(ModelConfig text)
    {
        if (!text.Json.TryGetPropertyValue("moe_layers_enum", out var node) || node is null) return null;
        // Python: int(i) for each non-blank item, whether the list holds numbers or strings.
        var items = node is JsonArray list
            ? list.Select(x => x?.ToJsonString().Trim('"') ?? "")
            : text.String("moe_layers_enum")!.Split(',');
        var set = new HashSet<int>();
        foreach (var item in items.Select(s => s.Trim()).Where(s => s.Length > 0))
        {
            if (!int.TryParse(item, NumberStyles.Integer, CultureInfo.InvariantCulture, out var index))
                throw new ConfigException($"config field 'moe_layers_enum' holds '{item}', not a layer index");
            set.Add(index);
        }
        return set;
    }

    /// <summary>The MoE block: v5 router, fused experts and shared_experts; on disk moe.* and share_expert.</summary>
    private static void Moe(TreeBuilder b, TextDims t, bool disk)
    {
        if (!disk)
        {
            using (b.Scope("mlp", P + "SparseMoeBlock", ModuleLocation.Other))
            {
                Blocks.TopKRouter(b, "gate", P + "TopKRouter", t.Experts, t.Hidden, correctionBias: true);
                Blocks.FusedExperts(b, P + "Experts", t.Experts, t.Hidden, t.MoeInter, t.ActClass);
                Blocks.GatedMlp(b, "shared_experts", P + "MLP", t.Hidden, t.SharedInter, false, t.ActClass, ModuleLocation.SharedExpert);
            }
            return;
        }
        using (b.Scope("moe", "Module", ModuleLocation.Other))
        {
            b.Linear("gate", t.Hidden, t.Experts, location: ModuleLocation.Router);
            b.Buffer("router_bias", t.Experts);
            // One 3-D weight per projection, (out, in) per expert; transformers fuses gate and up on load.
            foreach (var (name, outF, inF) in new[] { ("gate_proj", t.MoeInter, t.Hidden), ("up_proj", t.MoeInter, t.Hidden), ("down_proj", t.Hidden, t.MoeInter) })
            {
                using (b.Scope(name, "Module", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts, numExperts: t.Experts))
                    b.Param("weight", t.Experts, outF, inF);
            }
        }
        Blocks.GatedMlp(b, "share_expert", P + "MLP", t.Hidden, t.SharedInter, false, t.ActClass, ModuleLocation.SharedExpert);
    }

    /// <summary>Step3p7VisionModel (v5 names).</summary>
    private static void VisionModel(TreeBuilder b, VisionDims v)
    {
        using (b.Scope("vision_model", P + "VisionModel", ModuleLocation.Vision))
        {
            using (b.Scope("embeddings", P + "VisionEmbeddings"))
            {
                Blocks.Conv(b, "patch_embedding", "Conv2d", v.Channels, v.Hidden, false, v.Patch, v.Patch);
                b.Embedding("position_embedding", v.Positions, v.Hidden, ModuleLocation.Vision);
            }
            b.LayerNorm("pre_layernorm", v.Hidden);
            b.Leaf("rotary_emb", P + "VisionRotaryEmbedding");
            b.ModuleList("layers", v.Layers, j =>
            {
                using (b.Scope(j.ToString(CultureInfo.InvariantCulture), P + "VisionEncoderLayer"))
                {
                    b.Param("lambda_1", v.Hidden);
                    b.Param("lambda_2", v.Hidden);
                    Blocks.VisionSelfAttention(b, "self_attn", P + "VisionAttention", v.Hidden);
                    using (b.Scope("mlp", P + "VisionMLP"))
                    {
                        b.Leaf("activation_fn", v.ActClass);
                        b.Linear("fc1", v.Hidden, v.Inter, true);
                        b.Linear("fc2", v.Inter, v.Hidden, true);
                    }
                    b.LayerNorm("layernorm_before", v.Hidden);
                    b.LayerNorm("layernorm_after", v.Hidden);
                }
            });
            Blocks.Conv(b, "downsampler1", "Conv2d", v.Hidden, 2 * v.Hidden, true, 3, 3);
            Blocks.Conv(b, "downsampler2", "Conv2d", 2 * v.Hidden, 4 * v.Hidden, true, 3, 3);
        }
    }

    /// <summary>The vision tower as the checkpoint stores it (OpenCLIP names, q/k/v fused into in_proj_weight).</summary>
    private static void DiskVisionModel(TreeBuilder b, VisionDims v)
    {
        using (b.Scope("vision_model", "Module", ModuleLocation.Vision))
        {
            b.Param("positional_embedding", v.Positions, v.Hidden);
            Blocks.Conv(b, "conv1", "Conv2d", v.Channels, v.Hidden, false, v.Patch, v.Patch);
            b.LayerNorm("ln_pre", v.Hidden);
            using (b.Scope("transformer", "Module"))
            {
                b.ModuleList("resblocks", v.Layers, j =>
                {
                    using (b.Scope(j.ToString(CultureInfo.InvariantCulture), "Module"))
                    {
                        using (b.Scope("attn", "Module", kind: ModuleKind.Other))
                        {
                            b.Param("in_proj_weight", 3 * v.Hidden, v.Hidden);
                            b.Param("in_proj_bias", 3 * v.Hidden);
                            b.Linear("out_proj", v.Hidden, v.Hidden, true);
                        }
                        b.LayerNorm("ln_1", v.Hidden);
                        b.LayerNorm("ln_2", v.Hidden);
                        foreach (var scale in new[] { "ls_1", "ls_2" })
                        {
                            using (b.Scope(scale, "Module", kind: ModuleKind.Other))
                                b.Param("gamma", v.Hidden);
                        }
                        using (b.Scope("mlp", "Module"))
                        {
                            b.Linear("c_fc", v.Hidden, v.Inter, true);
                            b.Linear("c_proj", v.Inter, v.Hidden, true);
                        }
                    }
                });
            }
            Blocks.Conv(b, "vit_downsampler1", "Conv2d", v.Hidden, 2 * v.Hidden, true, 3, 3);
            Blocks.Conv(b, "vit_downsampler2", "Conv2d", 2 * v.Hidden, 4 * v.Hidden, true, 3, 3);
        }
    }

    /// <summary>Step3p7TextConfig's sizes and defaults (its attribute_map aliases included).</summary>
    private sealed record TextDims(long Vocab, long Hidden, long Inter, long MoeInter, long SharedInter, long Layers, long Heads,
        long Kv, long HeadDim, long Experts, long TopK, bool AttentionBias, bool Tie, string ActClass)
    {
        public static TextDims Read(ModelConfig t, Layout layout) => new(
            t.Positive("vocab_size", 128815), t.Positive("hidden_size", 4096), t.Positive("intermediate_size", 11264),
            t.Positive("moe_intermediate_size", 1280), t.FirstInt("share_expert_dim", "share_expert_dims") ?? 1280,
            t.Positive("num_hidden_layers", 45), t.Positive("num_attention_heads", 64),
            t.FirstInt("num_key_value_heads", "num_attention_groups") ?? 8, t.Positive("head_dim", 128),
            t.FirstInt("n_routed_experts", "num_local_experts", "moe_num_experts") ?? 288,
            t.FirstInt("num_experts_per_tok", "moe_top_k") ?? 8, t.Bool("attention_bias", false),
            t.Bool("tie_word_embeddings", false), Blocks.ActivationClass(t.String("hidden_act", "silu")!, layout));
    }

    /// <summary>Step3p7VisionConfig's sizes (legacy width/layers aliases; the MLP width from mlp_ratio).</summary>
    private sealed record VisionDims(long Hidden, long Inter, long Layers, long Channels, long Patch, long Positions, string ActClass, long Heads)
    {
        public static VisionDims Read(ModelConfig v, Layout layout)
        {
            var hidden = v.FirstInt("hidden_size", "width") ?? 1536;
            var image = v.Positive("image_size", 728);
            var patch = v.Positive("patch_size", 14);
            // __post_init__: intermediate_size = int(hidden_size * mlp_ratio), whatever the config says.
            var inter = (long)(hidden * v.Double("mlp_ratio", 8960.0 / 1536.0));
            return new(hidden, inter, v.FirstInt("num_hidden_layers", "layers") ?? 47, v.Positive("num_channels", 3), patch,
                (image / patch) * (image / patch), Blocks.ActivationClass(v.String("hidden_act", "quick_gelu")!, layout),
                v.FirstInt("num_attention_heads", "heads") ?? 16);
        }
    }
}
