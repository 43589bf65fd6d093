using System.Text.Json.Nodes;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Jamba (<c>jamba</c>): a Mamba/attention hybrid. Layer i is attention when
/// <c>i % attn_layer_period == attn_layer_offset</c> (else a Mamba mixer), and MoE when
/// <c>i % expert_layer_period == expert_layer_offset</c> and <c>num_experts &gt; 1</c> (else a dense JambaMLP).
/// There is no rotary embedding and the final norm is <c>model.final_layernorm</c>.
/// <para>
/// The router is a plain nn.Linear (<c>feed_forward.router</c>), so <c>all-linear</c> and <c>router</c> targets wrap
/// it. v5 fuses the experts (JambaExperts gate_up_proj/down_proj); v4 keeps a ModuleList of JambaMLP. PEFT 0.21 has
/// no MoE conversion entry for Jamba, so name targets such as <c>gate_proj</c> only reach the dense layers in v5.
/// </para>
/// <para>
/// The Mamba mixer registers its own A_log [Di, N] and D [Di] (first in named_parameters), then a depthwise Conv1d,
/// in/x/dt/out projections and RMSNorms over dt, B and C (Di = mamba_expand·H, N = mamba_d_state). The runtime
/// follows transformers' torch path (a sequential selective scan); like it, the mixer reads <c>dt_proj.weight</c>
/// directly, so a LoRA adapter on dt_proj does not change the output.
/// </para>
/// </summary>
internal sealed class JambaFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["jamba"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: JambaConfig.
        var vocab = c.Positive("vocab_size", 65536);
        var hidden = c.Positive("hidden_size", 4096);
        var inter = c.Positive("intermediate_size", 14336);
        var layers = c.Positive("num_hidden_layers", 32);
        var heads = c.Positive("num_attention_heads", 32);
        var kv = c.IntOrNull("num_key_value_heads", 8) ?? heads;
        var headDim = hidden / heads;
        var experts = c.Positive("num_experts", 16);
        var topK = c.Positive("num_experts_per_tok", 2);
        var expertPeriod = c.Positive("expert_layer_period", 2);
        var expertOffset = c.Int("expert_layer_offset", 1);
        var attnPeriod = c.Positive("attn_layer_period", 8);
        var attnOffset = c.Int("attn_layer_offset", 4);
        // JambaConfig raises when an offset is not below its period.
        if (expertOffset < 0 || expertOffset >= expertPeriod)
            throw new ConfigException($"expert_layer_offset ({expertOffset}) must be in [0, expert_layer_period={expertPeriod})");
        if (attnOffset < 0 || attnOffset >= attnPeriod)
            throw new ConfigException($"attn_layer_offset ({attnOffset}) must be in [0, attn_layer_period={attnPeriod})");
        var dState = c.Positive("mamba_d_state", 16);
        var dConv = c.Positive("mamba_d_conv", 4);
        var expand = c.Positive("mamba_expand", 2);
        var dtRank = DtRank(c, hidden);
        var convBias = c.Bool("mamba_conv_bias", true);
        var projBias = c.Bool("mamba_proj_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var inner = expand * hidden;

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers, i => experts > 1 && i % expertPeriod == expertOffset);
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder("JambaForCausalLM", layout);
        using (b.Scope("model", "JambaModel"))
        {
            b.Embedding("embed_tokens", vocab, hidden);
            b.ModuleList("layers", layers, i =>
            {
                var isAttention = i % attnPeriod == attnOffset;
                var layerClass = isAttention ? "JambaAttentionDecoderLayer" : "JambaMambaDecoderLayer";
                using (b.Scope(i.ToString(System.Globalization.CultureInfo.InvariantCulture), layerClass, ModuleLocation.Other, layer: i))
                {
                    if (isAttention)
                        Blocks.Attention(b, "JambaAttention", hidden, heads, kv, headDim, qkvBias: false, oBias: false);
                    else
                        MambaMixer(b, hidden, inner, dState, dConv, dtRank, convBias, projBias, actClass);

                    if (moeSet.Contains(i))
                    {
                        using (b.Scope("feed_forward", "JambaSparseMoeBlock", ModuleLocation.Other))
                        {
                            b.Linear("router", hidden, experts, location: ModuleLocation.Router);
                            if (layout == Layout.V5)
                                Blocks.FusedExperts(b, "JambaExperts", experts, hidden, inter, actClass);
                            else
                                Blocks.PerExpertMlps(b, "ModuleList", "JambaMLP", experts, hidden, inter, actClass);
                        }
                    }
                    else
                    {
                        Blocks.GatedMlp(b, "feed_forward", "JambaMLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
                    }
                    b.RmsNorm("input_layernorm", "JambaRMSNorm", hidden, ModuleLocation.Norm);
                    b.RmsNorm("pre_ff_layernorm", "JambaRMSNorm", hidden, ModuleLocation.Norm);
                }
            });
            b.RmsNorm("final_layernorm", "JambaRMSNorm", hidden, ModuleLocation.Norm);
        }
        b.Linear("lm_head", hidden, vocab, location: ModuleLocation.LmHead, tiedWeightTo: tie ? "model.embed_tokens.weight" : null);

        // Jamba takes the top-k of the softmax without renormalising.
        var moe = new MoeFacts(experts, topK, 0, inter, 0, moeLayers, denseLayers, $"softmax over {experts} experts, top-{topK}");
        var mamba = new MambaMixerSettings(inner, dState, dConv, dtRank, convBias, projBias, act, c.Double("rms_norm_eps", 1e-6));
        return Blocks.Spec(c, "jamba", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            Runtime = Runtime(c, layers, attnPeriod, attnOffset, moeSet, hidden, heads, kv, headDim, experts, topK, inter, act, vocab, tie, mamba),
        };
    }

    /// <summary>
    /// Each layer is pre-norm <c>h = x + mixer(input_layernorm(x))</c>, <c>out = h + feed_forward(pre_ff_layernorm(h))</c>
    /// (JambaAttentionDecoderLayer / JambaMambaDecoderLayer), the mixer attention without rotary or the Mamba-1 mixer,
    /// the feed-forward the sparse MoE block (an nn.Linear router: softmax over all experts in fp32, top-k, not
    /// renormalised) or a dense JambaMLP. The final norm is <c>final_layernorm</c>; there is no rotary module.
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig c, long layers, long attnPeriod, long attnOffset, HashSet<int> moeSet, long hidden,
        long heads, long kv, long headDim, long experts, long topK, long inter, string act, long vocab, bool tie, MambaMixerSettings mamba)
    {
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6));
        var attention = new StandardAttentionSettings(heads, kv, headDim, false, false, QkNormKind.None, 0, Sinks: false, MaskSettings.Full, headDim,
            new StandardAttentionOptions(Rotary: RotaryStyle.None));
        var moe = new MoeSettings(new SoftmaxTopKRouterSettings("router", experts, topK, NormTopK: false, LinearModule: true),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, inter, act), Shared: null, MoeOrder.RouterFirst);
        var mlp = new GatedMlpSettings(inter, act);
        var list = new List<DecoderLayerRuntime>();
        for (int i = 0; i < layers; i++)
        {
            var mixer = i % attnPeriod == attnOffset ? "self_attn" : "mamba";
            var form = new LayerForm([mixer, "feed_forward", "input_layernorm", "pre_ff_layernorm"], new NamedNorm("input_layernorm", norm), null,
                new NamedNorm("pre_ff_layernorm", norm), null, AttentionName: mixer);
            list.Add(new DecoderLayerRuntime(mixer == "mamba" ? mamba : attention, "feed_forward",
                moeSet.Contains(i) ? moe : mlp, norm, norm, form));
        }
        // No rotary module: the table below is never used (attention runs without rotation).
        return new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, new RopeSettings("default", 10000.0, headDim), list,
            Names: new ModelNames("embed_tokens", "final_layernorm", Rotary: null));
    }

    /// <summary>
    /// JambaMambaMixer. Counted as the layer's sequence mixer (ModuleLocation.Attention) so that reports group it with
    /// attention; the depthwise Conv1d is ModuleKind.Other because all-linear never selects it.
    /// </summary>
    private static void MambaMixer(TreeBuilder b, long hidden, long inner, long dState, long dConv, long dtRank,
        bool convBias, bool projBias, string actClass)
    {
        using (b.Scope("mamba", "JambaMambaMixer", ModuleLocation.Attention))
        {
            b.Param("A_log", inner, dState);
            b.Param("D", inner);
            using (b.Scope("conv1d", "Conv1d", kind: ModuleKind.Other))
            {
                b.Param("weight", inner, 1, dConv);
                if (convBias) b.Param("bias", inner);
            }
            b.Leaf("act", actClass);
            b.Linear("in_proj", hidden, inner * 2, projBias);
            b.Linear("x_proj", inner, dtRank + dState * 2);
            b.Linear("dt_proj", dtRank, inner, bias: true);
            b.Linear("out_proj", inner, hidden, projBias);
            b.RmsNorm("dt_layernorm", "JambaRMSNorm", dtRank);
            b.RmsNorm("b_layernorm", "JambaRMSNorm", dState);
            b.RmsNorm("c_layernorm", "JambaRMSNorm", dState);
        }
    }

    /// <summary><c>mamba_dt_rank</c>: an integer, or "auto" (the default) for ceil(hidden / 16).</summary>
    private static long DtRank(ModelConfig c, long hidden)
    {
        if (c.Json.TryGetPropertyValue("mamba_dt_rank", out var v) && v is JsonValue jv && jv.TryGetValue<string>(out var s))
        {
            if (s == "auto") return (hidden + 15) / 16;
            throw new ConfigException($"config field 'mamba_dt_rank' must be an integer or \"auto\", got \"{s}\"");
        }
        return c.Positive("mamba_dt_rank", (hidden + 15) / 16);
    }
}
