using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// LFM2-MoE (<c>lfm2_moe</c>): a hybrid whose layers are either gated short convolutions (Lfm2MoeShortConv: a
/// depthwise Conv1d of kernel <c>conv_L_cache</c>, in_proj to 3·H, out_proj) or attention (q/k/v/out_proj with
/// per-head q_layernorm / k_layernorm), as <c>layer_types</c> says ("full_attention" or anything else = conv). The
/// first <c>num_dense_layers</c> layers have a dense Lfm2MoeMLP (w1, w3, w2, no activation module), the rest a MoE
/// block: experts (no act_fn child: they call F.silu), then a sigmoid TopK router. <c>expert_bias</c> is a persistent
/// buffer, not a parameter. The final norm is <c>model.embedding_norm</c>, the rotary module <c>model.pos_emb</c>; the
/// lm_head is tied by default (<c>tie_embedding</c> is the legacy key).
/// <para>
/// Lfm2MoeConfig defaults <c>layer_types</c> to None, which transformers cannot build (it indexes it per layer), so it
/// is required here.
/// </para>
/// <para>v4 (the checkpoint layout): <c>feed_forward.gate.weight</c> and per-expert <c>experts.{e}.w1/w3/w2</c>.</para>
/// </summary>
internal sealed class Lfm2MoeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["lfm2_moe"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: Lfm2MoeConfig.
        var vocab = c.Positive("vocab_size", 65536);
        var hidden = c.Positive("hidden_size", 2048);
        var inter = c.Positive("intermediate_size", 7168);
        var moeInter = c.Positive("moe_intermediate_size", 1792);
        var layers = c.Positive("num_hidden_layers", 32);
        var heads = c.Positive("num_attention_heads", 32);
        var kv = c.Positive("num_key_value_heads", 8);
        var headDim = Blocks.HeadDim(c, hidden, heads);
        var convBias = c.Bool("conv_bias", false);
        var convL = c.Positive("conv_L_cache", 3);
        var numDense = c.Int("num_dense_layers", 2);
        var topK = c.Positive("num_experts_per_tok", 4);
        var experts = c.Positive("num_experts", 32);
        var tie = c.Has("tie_embedding") ? c.Bool("tie_embedding", true) : c.Bool("tie_word_embeddings", true);
        var layerTypes = c.StringList("layer_types")
            ?? throw new ConfigException("config field 'layer_types' is required for lfm2_moe (one of \"full_attention\" or \"conv\" per layer)");
        if (layerTypes.Count < layers)
            throw new ConfigException($"config field 'layer_types' has {layerTypes.Count} entries for {layers} layers");

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers, i => i >= numDense);
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder("Lfm2MoeForCausalLM", layout);
        using (b.Scope("model", "Lfm2MoeModel"))
        {
            b.Embedding("embed_tokens", vocab, hidden);
            b.ModuleList("layers", layers, i =>
            {
                using (b.Scope(i.ToString(System.Globalization.CultureInfo.InvariantCulture), "Lfm2MoeDecoderLayer", ModuleLocation.Other, layer: i))
                {
                    if (layerTypes[i] == "full_attention")
                    {
                        using (b.Scope("self_attn", "Lfm2MoeAttention", ModuleLocation.Attention))
                        {
                            b.Linear("q_proj", hidden, heads * headDim);
                            b.Linear("k_proj", hidden, kv * headDim);
                            b.Linear("v_proj", hidden, kv * headDim);
                            b.Linear("out_proj", heads * headDim, hidden);
                            b.RmsNorm("q_layernorm", "Lfm2MoeRMSNorm", headDim);
                            b.RmsNorm("k_layernorm", "Lfm2MoeRMSNorm", headDim);
                        }
                    }
                    else
                    {
                        // The layer's sequence mixer, grouped with attention; the depthwise Conv1d is never all-linear.
                        using (b.Scope("conv", "Lfm2MoeShortConv", ModuleLocation.Attention))
                        {
                            using (b.Scope("conv", "Conv1d", kind: ModuleKind.Other))
                            {
                                b.Param("weight", hidden, 1, convL);
                                if (convBias) b.Param("bias", hidden);
                            }
                            b.Linear("in_proj", hidden, 3 * hidden, convBias);
                            b.Linear("out_proj", hidden, hidden, convBias);
                        }
                    }
                    if (moeSet.Contains(i))
                    {
                        using (b.Scope("feed_forward", "Lfm2MoeSparseMoeBlock", ModuleLocation.Other))
                        {
                            if (layout == Layout.V5)
                            {
                                using (b.Scope("experts", "Lfm2MoeExperts", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts, numExperts: experts))
                                {
                                    b.Param("gate_up_proj", experts, 2 * moeInter, hidden);
                                    b.Param("down_proj", experts, hidden, moeInter);
                                }
                                Blocks.TopKRouter(b, "gate", "Lfm2MoeTopKRouter", experts, hidden);
                            }
                            else
                            {
                                b.Linear("gate", hidden, experts, location: ModuleLocation.Router);
                                b.ModuleList("experts", experts, e =>
                                {
                                    using (b.Scope(e.ToString(System.Globalization.CultureInfo.InvariantCulture), "Lfm2MoeMLP", ModuleLocation.RoutedExpert))
                                        Mlp(b, hidden, moeInter);
                                });
                            }
                        }
                    }
                    else
                    {
                        using (b.Scope("feed_forward", "Lfm2MoeMLP", ModuleLocation.Mlp))
                            Mlp(b, hidden, inter);
                    }
                    b.RmsNorm("operator_norm", "Lfm2MoeRMSNorm", hidden, ModuleLocation.Norm);
                    b.RmsNorm("ffn_norm", "Lfm2MoeRMSNorm", hidden, ModuleLocation.Norm);
                }
            });
            b.Leaf("pos_emb", "Lfm2MoeRotaryEmbedding");
            b.RmsNorm("embedding_norm", "Lfm2MoeRMSNorm", hidden, ModuleLocation.Norm);
        }
        b.Linear("lm_head", hidden, vocab, location: ModuleLocation.LmHead, tiedWeightTo: tie ? "model.embed_tokens.weight" : null);

        var routing = $"sigmoid over {experts} experts" + (c.Bool("use_expert_bias", true) ? " + expert_bias for the choice" : "") +
            $", top-{topK}" + (c.Bool("norm_topk_prob", true) ? ", renormalised" : "") +
            $", scaled by {c.Double("routed_scaling_factor", 1.0)}";
        var moe = moeLayers.Count == 0 ? MoeFacts.Dense(layers)
            : new MoeFacts(experts, topK, 0, moeInter, 0, moeLayers, denseLayers, routing);
        return Blocks.Spec(c, "lfm2_moe", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, "silu") with
        {
            Runtime = Runtime(c, layers, layerTypes, moeSet, hidden, heads, kv, headDim, inter, moeInter, experts, topK, convL, convBias, tie, vocab),
        };
    }

    /// <summary>
    /// Pre-norm layers (operator_norm before the mixer, ffn_norm before the feed-forward) whose mixer is the short
    /// convolution (<c>conv</c>) or attention (<c>self_attn</c>: per-head q_layernorm / k_layernorm before rope,
    /// out_proj). MoE: experts then gate; sigmoid scores, selection on scores + the block's expert_bias buffer,
    /// weights renormalised with +1e-6 and times routed_scaling_factor. The activation is SiLU whatever hidden_act says.
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig c, long layers, IReadOnlyList<string> layerTypes, HashSet<int> moeSet, long hidden, long heads,
        long kv, long headDim, long inter, long moeInter, long experts, long topK, long convL, bool convBias, bool tie, long vocab)
    {
        var norm = new NormSettings(NormKind.Rms, c.Double("norm_eps", 1e-5));
        var attention = new StandardAttentionSettings(heads, kv, headDim, false, false, QkNormKind.PerHead, norm.Eps, Sinks: false,
            MaskSettings.Full, headDim, new StandardAttentionOptions(QNormName: "q_layernorm", KNormName: "k_layernorm", OName: "out_proj"));
        var conv = new ShortConvSettings(convL, convBias);
        var dense = new GatedMlpSettings(inter, "silu", ActName: null, Names: new GatedMlpNames("w1", "w3", "w2"));
        var bias = c.Bool("use_expert_bias", true) ? new ScoreBias("expert_bias", ScoreBiasOwner.Block, IsParameter: false) : null;
        var moe = new MoeSettings(
            new SigmoidBiasRouterSettings("gate", experts, topK, bias, c.Bool("norm_topk_prob", true), NormEps: 1e-6,
                Scale: c.Double("routed_scaling_factor", 1.0), SoftCap: 0, ScoresInModelDtype: true),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, "silu"), Shared: null, MoeOrder.ExpertsFirst);
        var list = new List<DecoderLayerRuntime>();
        for (int i = 0; i < layers; i++)
        {
            var isAttention = layerTypes[i] == "full_attention";
            var mixer = isAttention ? "self_attn" : "conv";
            var form = new LayerForm([mixer, "feed_forward", "operator_norm", "ffn_norm"], new NamedNorm("operator_norm", norm), null,
                new NamedNorm("ffn_norm", norm), null, AttentionName: mixer);
            list.Add(new DecoderLayerRuntime(isAttention ? attention : conv, "feed_forward", moeSet.Contains(i) ? moe : dense, norm, norm, form));
        }
        return new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, RopeSettings.Read(c, 1000000.0, headDim), list,
            Names: new ModelNames("embed_tokens", "embedding_norm", "pos_emb", RotaryBeforeNorm: true));
    }

    /// <summary>Lfm2MoeMLP: w1 (gate), w3 (up), w2 (down), in that order; the activation is F.silu, not a module.</summary>
    private static void Mlp(TreeBuilder b, long hidden, long inter)
    {
        b.Linear("w1", hidden, inter);
        b.Linear("w3", hidden, inter);
        b.Linear("w2", inter, hidden);
    }
}
