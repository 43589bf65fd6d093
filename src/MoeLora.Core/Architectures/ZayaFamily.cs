using System.Text.Json.Nodes;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// ZAYA (<c>zaya</c>, <c>ZayaForCausalLM</c>). Attention is CCA (compressed convolutional attention): the layer's
/// <c>qkv_proj</c> holds q_proj, k_proj, two half-width value projections (<c>v_proj_current</c> for this token,
/// <c>v_proj_delayed</c> for the previous one) and two Conv1d over the q|k channels (depthwise of kernel
/// <c>cca_time0</c>, then grouped by heads + kv heads of kernel <c>cca_time1</c>); a per-kv-head temperature
/// (<c>qk_norm.temp</c>) scales the L2-normalised keys. Every layer is MoE with fused experts and an MLP router:
/// down_proj to <c>router_hidden_size</c>, then an RMSNorm, fc1 and fc2 (GELU) and out_proj onto the experts plus one
/// skip expert; from layer 1 on the router adds the previous layer's router state scaled by
/// <c>router_states_scale</c>. Residual additions go through learned scale/bias pairs (<c>*_residual_scale</c>), and
/// the model scales and shifts the embeddings (<c>input_hidden_states_scale/bias</c>).
/// <para>
/// Not in transformers 4.57 and without a conversion mapping: <see cref="Layout.V4"/>, the checkpoint layout, has the
/// v5 names. The Conv1d are grouped convolutions, declared as <see cref="ModuleKind.Other"/> as in the other families
/// (all-linear never selects them; PEFT's LoRA for grouped convs is not reproduced).
/// </para>
/// <para>
/// Runtime (checked against a transformers fixture, router logits included): <see cref="CcaAttentionSettings"/> with
/// each layer type's rope, <see cref="MlpRouterSettings"/> handing its state from layer to layer, fused experts, the
/// layer's <see cref="LayerForm.AffineResiduals"/>, the model's <see cref="DecoderRuntime.EmbeddingAffine"/> and its
/// fp32 residual stream (<see cref="DecoderRuntime.ResidualInFp32"/>).
/// </para>
/// </summary>
internal sealed class ZayaFamily : IArchitecture
{
    private const string P = "Zaya";

    public IReadOnlyList<string> ModelTypes => ["zaya"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: ZayaConfig.
        var vocab = c.Positive("vocab_size", 262272);
        var hidden = c.Positive("hidden_size", 2048);
        var layers = c.Positive("num_hidden_layers", 40);
        var heads = c.Positive("num_attention_heads", 8);
        var kv = c.Positive("num_key_value_heads", 2);
        var headDim = c.Positive("head_dim", 128);
        var experts = c.Positive("num_experts", 16);
        var topK = c.Positive("num_experts_per_tok", 1);
        var moeInter = c.Positive("moe_intermediate_size", 2048);
        var routerHidden = c.Positive("router_hidden_size", 256);
        var depthwiseKernel = c.Positive("cca_time0", 2);
        var groupedKernel = c.Positive("cca_time1", 2);
        var bias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", true);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        // ZayaConfig.validate_architecture.
        if (topK != 1) throw new ConfigException($"ZAYA supports num_experts_per_tok=1 only, got {topK}");
        if (heads % kv != 0)
            throw new ConfigException($"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv})");
        var types = c.StringList("layer_types") ?? Enumerable.Repeat("hybrid", (int)layers).ToList();
        if (types.Count < layers) throw new ConfigException($"config field 'layer_types' needs {layers} entries");
        Blocks.CheckLayerTypes(types, "layer_types", "hybrid", "hybrid_sliding");
        if (types.Contains("hybrid_sliding") && !c.Has("sliding_window"))
            throw new ConfigException("config field 'sliding_window' must be set when 'layer_types' contains 'hybrid_sliding'");

        var b = new TreeBuilder(P + "ForCausalLM", layout);
        Blocks.CausalLm(b, P, vocab, hidden, layers, tie, i =>
        {
            using (b.Scope("self_attn", P + "Attention", ModuleLocation.Attention))
            {
                b.Linear("o_proj", heads * headDim, hidden, bias);
                CcaProjection(b, hidden, heads, kv, headDim, bias, depthwiseKernel, groupedKernel);
                using (b.Scope("qk_norm", P + "QKNorm", kind: ModuleKind.Other))
                    b.Param("temp", kv);
            }
            using (b.Scope("mlp", P + "SparseMoeBlock", ModuleLocation.Other))
            {
                Router(b, hidden, routerHidden, experts, usesPreviousState: i != 0);
                Blocks.FusedExperts(b, P + "Experts", experts, hidden, moeInter, actClass);
            }
            b.RmsNorm("input_layernorm", P + "RMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", P + "RMSNorm", hidden, ModuleLocation.Norm);
            ResidualScaling(b, "post_attention_residual_scale", hidden);
            ResidualScaling(b, "post_mlp_residual_scale", hidden);
        }, modelTail: () =>
        {
            // ZayaModel's own parameters (registered after its modules, listed first by named_parameters).
            b.Param("input_hidden_states_scale", hidden);
            b.Param("input_hidden_states_bias", hidden);
        }, lmHeadBias: c.Bool("lm_head_bias", false));

        var all = Enumerable.Range(0, (int)layers).ToList();
        var routing = $"MLP router: softmax over {experts} experts + 1 skip expert, top-{topK} after adding the balancing " +
            "biases (a chosen skip expert contributes nothing); from layer 1 on the router also reads the previous layer's router state";
        var moe = new MoeFacts(experts, topK, 0, moeInter, 0, all, [], routing);
        var spec = Blocks.Spec(c, "zaya", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        // ZayaConfig's default rope_parameters (used only when the config gives none), per layer type.
        var ropes = new Dictionary<string, (RopeSettings Rope, long RotaryDim)>(StringComparer.Ordinal);
        foreach (var type in types.Take((int)layers).Distinct())
        {
            var given = c.Sub("rope_parameters");
            var sub = given?.Sub(type);
            if (given is not null && sub is null) return spec with { RuntimeUnavailable = $"rope_parameters without an entry for layer type '{type}'" };
            double theta = type == "hybrid" ? 5_000_000.0 : 10_000.0;
            long dim = (long)(headDim * (sub?.Double("partial_rotary_factor", 1.0) ?? 0.5));
            var rope = sub is null ? new RopeSettings("default", theta, dim)
                : RopeSettings.Read(new ModelConfig(new JsonObject { ["rope_parameters"] = sub.Json.DeepClone() }), theta, dim);
            ropes[type] = (rope, 2 * ((dim + 1) / 2));
        }
        var eps = c.Double("rms_norm_eps", 1e-5);
        var norm = new NormSettings(NormKind.Rms, eps);
        var form = new LayerForm(["self_attn", "mlp", "input_layernorm", "post_attention_layernorm", "post_attention_residual_scale", "post_mlp_residual_scale"],
            new NamedNorm("input_layernorm", norm), null, new NamedNorm("post_attention_layernorm", norm), null,
            AffineResiduals: ("post_attention_residual_scale", "post_mlp_residual_scale"));
        var runtimeLayers = Enumerable.Range(0, (int)layers).Select(i =>
        {
            var (rope, rotaryDim) = ropes[types[i]];
            var mask = types[i] == "hybrid_sliding" ? new MaskSettings(MaskKind.Sliding, c.Int("sliding_window", 0)) : MaskSettings.Full;
            var attention = new CcaAttentionSettings(heads, kv, headDim, bias, depthwiseKernel, groupedKernel, rotaryDim, rope, mask);
            var sparse = new MoeSettings(new MlpRouterSettings("gate", experts, topK, routerHidden, UsesPreviousState: i != 0, eps),
                new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act), null, MoeOrder.RouterFirst);
            return new DecoderLayerRuntime(attention, "mlp", sparse, norm, norm, form);
        }).ToList();
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, ropes[types[0]].Rope, runtimeLayers,
                LmHeadBias: c.Bool("lm_head_bias", false), EmbeddingAffine: ("input_hidden_states_scale", "input_hidden_states_bias"),
                ResidualInFp32: true),
        };
    }

    /// <summary>ZayaCCAProjection: q/k/v projections and the two Conv1d over the q|k channels.</summary>
    private static void CcaProjection(TreeBuilder b, long hidden, long heads, long kv, long headDim, bool bias,
        long depthwiseKernel, long groupedKernel)
    {
        using (b.Scope("qkv_proj", P + "CCAProjection"))
        {
            var q = heads * headDim;
            var k = kv * headDim;
            b.Linear("q_proj", hidden, q, bias);
            b.Linear("k_proj", hidden, k, bias);
            // Each value head is half this token's projection, half the previous token's.
            b.Linear("v_proj_current", hidden, k / 2, bias);
            b.Linear("v_proj_delayed", hidden, k / 2, bias);
            var channels = q + k;
            GroupedConv1d(b, "conv_qk_depthwise", channels, groups: channels, depthwiseKernel);
            GroupedConv1d(b, "conv_qk_grouped", channels, groups: heads + kv, groupedKernel);
        }
    }

    /// <summary>nn.Conv1d(channels, channels, kernel, groups) with bias: weight [channels, channels / groups, kernel].</summary>
    private static void GroupedConv1d(TreeBuilder b, string name, long channels, long groups, long kernel)
    {
        using (b.Scope(name, "Conv1d", kind: ModuleKind.Other))
        {
            b.Param("weight", channels, channels / groups, kernel);
            b.Param("bias", channels);
        }
    }

    /// <summary>
    /// ZayaRouter: down_proj into the router width, the previous layer's state scale (not on layer 0), the router MLP
    /// over experts + 1 skip expert, and the persistent balancing_biases buffer.
    /// </summary>
    private static void Router(TreeBuilder b, long hidden, long routerHidden, long experts, bool usesPreviousState)
    {
        using (b.Scope("gate", P + "Router", ModuleLocation.Router))
        {
            if (usesPreviousState) b.Param("router_states_scale", routerHidden);
            b.Linear("down_proj", hidden, routerHidden, bias: true);
            using (b.Scope("router_mlp", P + "RouterMLP"))
            {
                b.RmsNorm("norm", P + "RMSNorm", routerHidden);
                b.Linear("fc1", routerHidden, routerHidden, bias: true);
                b.Linear("fc2", routerHidden, routerHidden, bias: true);
                b.Linear("out_proj", routerHidden, experts + 1);
                b.Leaf("act_fn", "GELU");
            }
            b.Buffer("balancing_biases", experts + 1);
        }
    }

    /// <summary>ZayaResidualScaling: (h + hidden_states_bias)·hidden_states_scale + (r + residual_bias)·residual_scale.</summary>
    private static void ResidualScaling(TreeBuilder b, string name, long hidden)
    {
        using (b.Scope(name, P + "ResidualScaling", ModuleLocation.Other, kind: ModuleKind.Other))
        {
            b.Param("hidden_states_scale", hidden);
            b.Param("hidden_states_bias", hidden);
            b.Param("residual_scale", hidden);
            b.Param("residual_bias", hidden);
        }
    }
}
