using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Nemotron-H (<c>nemotron_h</c>): each NemotronHBlock is a norm and one mixer chosen by <c>layers_block_type</c>
/// (the layer count is its length): a Mamba2 mixer (linear_attention), attention without rotary (full_attention), a
/// non-gated relu² MLP (mlp) or an MoE (moe): fused up/down experts (no gate), a sigmoid router with
/// e_score_correction_bias and group-limited top-k (DeepSeek-V3 style), a shared MLP, and latent projections when
/// <c>moe_latent_size</c> is set. The LM head is never tied (<c>_tied_weights_keys</c> is empty).
/// <para>
/// Not in transformers 4.57: <see cref="Layout.V4"/> means the on-disk checkpoint layout, which transformers 5.17
/// writes under <c>backbone.</c> with per-expert <c>experts.{e}.up_proj/down_proj</c> (ModuleList of NemotronHMLP),
/// and which also holds each router's persistent <c>e_score_correction_bias</c> (a declared buffer, renamed with the rest).
/// </para>
/// </summary>
internal sealed class NemotronHFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["nemotron_h"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: NemotronHConfig.
        var vocab = c.Positive("vocab_size", 131072);
        var hidden = c.Positive("hidden_size", 4096);
        var types = LayerTypes(c);
        var layers = types.Count;
        var heads = c.Positive("num_attention_heads", 32);
        var kv = c.IntOrNull("num_key_value_heads", 8) ?? heads;
        var headDim = Blocks.HeadDim(c, hidden, heads, classDefault: 128);
        var inter = c.Positive("intermediate_size", 21504);
        var mlpBias = c.Bool("mlp_bias", false);
        var mlpAct = Blocks.ActivationClass(c.String("mlp_hidden_act", "relu2")!, layout);
        var experts = c.FirstInt("n_routed_experts", "num_local_experts") ?? 8;
        var shared = c.Int("n_shared_experts", 1);
        var topK = c.Positive("num_experts_per_tok", 2);
        var moeInter = c.Positive("moe_intermediate_size", 7688);
        var sharedInter = c.Positive("moe_shared_expert_intermediate_size", 7688);
        var latent = c.IntOrNull("moe_latent_size", null);
        var mamba = new MambaDims(
            c.Positive("mamba_num_heads", 128), c.Positive("mamba_head_dim", 64), c.Positive("ssm_state_size", 128),
            // NemotronHConfig lets the legacy mamba_* keys override the current ones.
            c.FirstInt("mamba_n_groups", "n_groups") ?? 8, c.FirstInt("mamba_d_conv", "conv_kernel") ?? 4,
            c.Has("mamba_conv_bias") ? c.Bool("mamba_conv_bias", true) : c.Bool("use_conv_bias", true), c.Bool("use_bias", false),
            Blocks.ActivationClass(c.String("mamba_hidden_act", "silu")!, layout));
        var v4 = layout == Layout.V4;
        var root = v4 ? "backbone" : "model";

        var b = new TreeBuilder("NemotronHForCausalLM", layout);
        using (b.Scope(root, "NemotronHModel"))
        {
            b.Embedding("embeddings", vocab, hidden);
            b.ModuleList("layers", layers, i =>
            {
                using (b.Scope(i.ToString(System.Globalization.CultureInfo.InvariantCulture), "NemotronHBlock", ModuleLocation.Other, layer: i))
                {
                    b.RmsNorm("norm", "NemotronHRMSNorm", hidden, ModuleLocation.Norm);
                    switch (types[i])
                    {
                        case "linear_attention": Mamba2Mixer(b, hidden, mamba); break;
                        case "full_attention":
                            using (b.Scope("mixer", "NemotronHAttention", ModuleLocation.Attention))
                            {
                                b.Linear("q_proj", hidden, heads * headDim);
                                b.Linear("k_proj", hidden, kv * headDim);
                                b.Linear("v_proj", hidden, kv * headDim);
                                b.Linear("o_proj", heads * headDim, hidden);
                            }
                            break;
                        case "mlp": Mlp(b, "mixer", hidden, inter, mlpBias, mlpAct, ModuleLocation.Mlp); break;
                        default:
                            using (b.Scope("mixer", "NemotronHMoE", ModuleLocation.Other))
                            {
                                var width = latent ?? hidden;
                                if (v4)
                                {
                                    using (b.Scope("experts", "ModuleList", ModuleLocation.RoutedExpert))
                                        for (var e = 0; e < experts; e++)
                                            Mlp(b, e.ToString(System.Globalization.CultureInfo.InvariantCulture), width, moeInter, false, mlpAct, ModuleLocation.RoutedExpert);
                                }
                                else
                                {
                                    using (b.Scope("experts", "NemotronHExperts", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts, numExperts: experts))
                                    {
                                        b.Param("up_proj", experts, moeInter, width);
                                        b.Param("down_proj", experts, width, moeInter);
                                        b.Leaf("act_fn", mlpAct);
                                    }
                                }
                                using (b.Scope("gate", "NemotronHTopkRouter", ModuleLocation.Router, kind: ModuleKind.Router))
                                {
                                    b.Param("weight", experts, hidden);
                                    b.Buffer("e_score_correction_bias", experts);
                                }
                                Mlp(b, "shared_experts", hidden, sharedInter, mlpBias, mlpAct, ModuleLocation.SharedExpert);
                                if (latent is { } l)
                                {
                                    b.Linear("fc1_latent_proj", hidden, l, mlpBias);
                                    b.Linear("fc2_latent_proj", l, hidden, mlpBias);
                                }
                                else
                                {
                                    b.Leaf("fc1_latent_proj", "Identity");
                                    b.Leaf("fc2_latent_proj", "Identity");
                                }
                            }
                            break;
                    }
                }
            });
            b.RmsNorm("norm_f", "NemotronHRMSNorm", hidden, ModuleLocation.Norm);
        }
        b.Linear("lm_head", hidden, vocab, location: ModuleLocation.LmHead);

        var (moeLayers, _) = Blocks.SplitLayers(layers, i => types[i] == "moe");
        var (denseLayers, _) = Blocks.SplitLayers(layers, i => types[i] == "mlp");
        var routing = $"sigmoid over {experts} experts (+ e_score_correction_bias for the choice), top-{topK}" +
            (c.Int("n_group", 1) > 1 ? $" within the top-{c.Int("topk_group", 1)} of {c.Int("n_group", 1)} groups" : "") +
            (c.Bool("norm_topk_prob", true) ? ", renormalised" : "") +
            $", scaled by {c.Double("routed_scaling_factor", 1.0)}, plus a shared relu² MLP; experts are non-gated relu² MLPs";
        var moe = new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers, routing);
        return Blocks.Spec(c, "nemotron_h", b.Build(), moe, hidden, layers, vocab, heads, kv, tie: false,
            act: c.String("mlp_hidden_act", "relu2")!) with
        {
            DecoderLayersPath = root + ".layers",
            InputEmbeddings = root + ".embeddings",
        } with
        {
            Runtime = Runtime(c, types, hidden, heads, kv, headDim, inter, mlpBias, experts, topK, moeInter, sharedInter, latent, mamba, vocab),
        };
    }

    /// <summary>
    /// Each NemotronHBlock is <c>x + mixer(norm(x))</c>, registered norm, mixer: a one-sublayer form whose mixer is
    /// the Mamba-2 mixer, attention without rotary (full attention), a relu² MLP or the MoE block. The final norm is
    /// <c>norm_f</c>, the embeddings <c>embeddings</c>; there is no rotary module.
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig c, IReadOnlyList<string> types, long hidden, long heads, long kv, long headDim,
        long inter, bool mlpBias, long experts, long topK, long moeInter, long sharedInter, long? latent, MambaDims d, long vocab)
    {
        var norm = new NormSettings(NormKind.Rms, c.Double("layer_norm_epsilon", 1e-5));
        var act = c.String("mlp_hidden_act", "relu2")!;
        var attention = new StandardAttentionSettings(heads, kv, headDim, false, false, QkNormKind.None, 0, Sinks: false, MaskSettings.Full, headDim, new StandardAttentionOptions(Rotary: RotaryStyle.None));
        var stepMin = c.Double("time_step_min", 0.001);
        var mamba = new Mamba2MixerSettings(d.Heads, d.HeadDim, d.State, d.Groups, d.Kernel, d.ConvBias, d.Bias, c.String("mamba_hidden_act", "silu")!,
            norm.Eps, NormGroupSize: d.Heads * d.HeadDim / d.Groups, TimeStepClamp: (stepMin, double.PositiveInfinity), MaskBatchedOnly: false,
            c.Positive("chunk_size", 128), InitialDt: (stepMin, c.Double("time_step_max", 0.1), c.Double("time_step_floor", 1e-4)));
        var mlp = new NonGatedMlpSettings(inter, act, mlpBias);
        var moe = new NonGatedMoeSettings(
            new SigmoidGroupLimitedRouterSettings("gate", experts, topK, c.Int("n_group", 1), c.Int("topk_group", 1), c.Bool("norm_topk_prob", true),
                c.Double("routed_scaling_factor", 1.0)),
            moeInter, act, new NonGatedMlpSettings(sharedInter, act, mlpBias), latent, mlpBias);
        var withMixer = new LayerForm(["norm", "mixer"], new NamedNorm("norm", norm), null, null, null, AttentionName: "mixer");
        var withFeedForward = new LayerForm(["norm", "mixer"], null, null, new NamedNorm("norm", norm), null, AttentionName: "mixer");
        var layers = types.Select(t => t switch
        {
            "linear_attention" => new DecoderLayerRuntime(mamba, "mixer", new NoFeedForwardSettings(), norm, norm, withMixer),
            "full_attention" => new DecoderLayerRuntime(attention, "mixer", new NoFeedForwardSettings(), norm, norm, withMixer),
            "mlp" => new DecoderLayerRuntime(new NoAttentionSettings(), "mixer", mlp, norm, norm, withFeedForward),
            _ => new DecoderLayerRuntime(new NoAttentionSettings(), "mixer", moe, norm, norm, withFeedForward),
        }).ToList();
        // No rotary module: the table below is never used (attention runs without rotation).
        return new DecoderRuntime(vocab, hidden, TieWordEmbeddings: false, c.Double("initializer_range", 0.02), norm,
            new RopeSettings("default", 10000.0, headDim), layers, Names: new ModelNames("embeddings", "norm_f", Rotary: null));
    }

    private sealed record MambaDims(long Heads, long HeadDim, long State, long Groups, long Kernel, bool ConvBias, bool Bias, string ActClass);

    /// <summary><c>layers_block_type</c> (alias <c>layer_types</c>, legacy <c>hybrid_override_pattern</c> M/E/*/-), default M E * -.</summary>
    private static IReadOnlyList<string> LayerTypes(ModelConfig c)
    {
        var types = Blocks.LayerTypes(c, "layers_block_type") ?? Blocks.LayerTypes(c);
        if (types is null && c.String("hybrid_override_pattern") is { } pattern)
        {
            types = pattern.Select(ch => ch switch
            {
                'M' => "linear_attention",
                'E' => "moe",
                '*' => "full_attention",
                '-' => "mlp",
                _ => throw new ConfigException($"config field 'hybrid_override_pattern' holds '{ch}'; expected M, E, * or -"),
            }).ToList();
        }
        types ??= ["linear_attention", "moe", "full_attention", "mlp"];
        if (types.Count == 0) throw new ConfigException("config field 'layers_block_type' is empty");
        Blocks.CheckLayerTypes(types, "layers_block_type", "full_attention", "linear_attention", "moe", "mlp");
        return types;
    }

    /// <summary>NemotronHMLP: up_proj, down_proj, relu² (no gate).</summary>
    private static void Mlp(TreeBuilder b, string name, long hidden, long inter, bool bias, string act, ModuleLocation location)
    {
        using (b.Scope(name, "NemotronHMLP", location))
        {
            b.Linear("up_proj", hidden, inter, bias);
            b.Linear("down_proj", inter, hidden, bias);
            b.Leaf("act_fn", act);
        }
    }

    /// <summary>
    /// NemotronHMamba2Mixer: dt_bias, A_log, D [heads] first, then the activation, a depthwise Conv1d over
    /// x|B|C (conv_dim = heads·head_dim + 2·groups·state), in_proj to x|z... (intermediate + conv_dim + heads), the
    /// gated RMSNorm over the intermediate width and out_proj. Counted as the layer's sequence mixer.
    /// </summary>
    private static void Mamba2Mixer(TreeBuilder b, long hidden, MambaDims d)
    {
        var inner = d.Heads * d.HeadDim;
        var convDim = inner + 2 * d.Groups * d.State;
        using (b.Scope("mixer", "NemotronHMamba2Mixer", ModuleLocation.Attention))
        {
            b.Param("dt_bias", d.Heads);
            b.Param("A_log", d.Heads);
            b.Param("D", d.Heads);
            b.Leaf("act", d.ActClass);
            using (b.Scope("conv1d", "Conv1d", kind: ModuleKind.Other))
            {
                b.Param("weight", convDim, 1, d.Kernel);
                if (d.ConvBias) b.Param("bias", convDim);
            }
            b.Linear("in_proj", hidden, inner + convDim + d.Heads, d.Bias);
            b.RmsNorm("norm", "Zamba2RMSNormGated", inner);
            b.Linear("out_proj", inner, hidden, d.Bias);
        }
    }
}
