using System.Text.Json.Nodes;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Qwen3-Omni-MoE's thinker (<c>qwen3_omni_moe_thinker</c>, Qwen3OmniMoeThinkerForConditionalGeneration): an audio
/// encoder (<c>audio_tower</c>), a vision encoder (<c>visual</c>), then the Qwen3-MoE text model at <c>model</c> and
/// <c>lm_head</c> at the root. The text model follows the Qwen2-MoE layer rule (MoE unless in <c>mlp_only_layers</c>
/// or off <c>decoder_sparse_step</c>), has no shared expert, and per-head q/k norms; its final norm is a
/// Qwen3OmniMoeTextRMSNorm. <c>tie_word_embeddings</c> is the thinker config's.
/// <para>
/// Audio (Whisper-like): per layer k/v/q/out_proj (with bias, in that order), LayerNorms and fc1/fc2; then ln_post,
/// three stride-2 Conv2d of <c>downsample_hidden_size</c> channels, conv_out (no bias) from
/// downsample_hidden_size · ceil³(num_mel_bins / 2) to d_model, proj1 and proj2 to <c>output_dim</c>.
/// Vision (Qwen3-VL): one post-shuffle PatchMerger per <c>deepstack_visual_indexes</c> entry (registered first), a
/// Conv3d patch embedding, a learned position nn.Embedding, blocks with fused qkv, and the final merger. Both towers
/// are <see cref="ModuleLocation.Vision"/>; the patch mergers, which project into the text width, are
/// <see cref="ModuleLocation.Projector"/>.
/// </para>
/// <para>v4 (4.57, same as the checkpoint): per-expert <c>mlp.experts.{e}.gate_proj/up_proj/down_proj</c>.</para>
/// </summary>
internal sealed class Qwen3OmniMoeFamily : IArchitecture
{
    private const string P = "Qwen3OmniMoe";
    private const string T = "Qwen3OmniMoeThinkerText";

    public IReadOnlyList<string> ModelTypes => ["qwen3_omni_moe_thinker"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        ModelConfig Sub(string name) => c.Sub(name) ?? new ModelConfig(new JsonObject(), c);
        var text = Sub("text_config");

        // Defaults: Qwen3OmniMoeTextConfig.
        var vocab = text.Positive("vocab_size", 3584);
        var hidden = text.Positive("hidden_size", 2048);
        var inter = text.Positive("intermediate_size", 18944);
        var layers = text.Positive("num_hidden_layers", 28);
        var heads = text.Positive("num_attention_heads", 28);
        var kv = text.Positive("num_key_value_heads", 4);
        var headDim = Blocks.HeadDim(text, hidden, heads);
        var step = text.Int("decoder_sparse_step", 1);
        var moeInter = text.Positive("moe_intermediate_size", 768);
        var topK = text.Positive("num_experts_per_tok", 8);
        var experts = text.Int("num_experts", 128);
        var mlpOnly = new HashSet<long>(text.IntList("mlp_only_layers") ?? []);
        var bias = text.Bool("attention_bias", false);
        var act = text.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        // Qwen3OmniMoeThinkerConfig declares tie_word_embeddings (default False); the text config does not.
        var tie = c.Bool("tie_word_embeddings", false);

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers,
            i => !mlpOnly.Contains(i) && experts > 0 && step > 0 && (i + 1) % step == 0);
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder(P + "ThinkerForConditionalGeneration", layout);
        Audio(b, Sub("audio_config"), layout);
        Vision(b, Sub("vision_config"), layout);
        Blocks.CausalLm(b, T, vocab, hidden, layers, tie, i =>
        {
            Blocks.Attention(b, T + "Attention", hidden, heads, kv, headDim, bias, bias, afterProjections: bb =>
            {
                bb.RmsNorm("q_norm", T + "RMSNorm", headDim);
                bb.RmsNorm("k_norm", T + "RMSNorm", headDim);
            });
            if (moeSet.Contains(i))
            {
                using (b.Scope("mlp", T + "SparseMoeBlock", ModuleLocation.Other))
                {
                    if (layout == Layout.V5)
                    {
                        Blocks.FusedExperts(b, T + "Experts", experts, hidden, moeInter, actClass);
                        Blocks.TopKRouter(b, "gate", T + "TopKRouter", experts, hidden);
                    }
                    else
                    {
                        b.Linear("gate", hidden, experts, location: ModuleLocation.Router);
                        Blocks.PerExpertMlps(b, "ModuleList", T + "MLP", experts, hidden, moeInter, actClass);
                    }
                }
            }
            else
            {
                Blocks.GatedMlp(b, "mlp", T + "MLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
            }
            b.RmsNorm("input_layernorm", T + "RMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", T + "RMSNorm", hidden, ModuleLocation.Norm);
        }, normClass: "Qwen3OmniMoeTextRMSNorm");

        var routing = $"softmax over {experts} experts, top-{topK}" + (text.Bool("norm_topk_prob", true) ? ", renormalised" : "");
        var moe = moeLayers.Count == 0 ? MoeFacts.Dense(layers)
            : new MoeFacts(experts, topK, 0, moeInter, 0, moeLayers, denseLayers, routing);
        return Blocks.Spec(c, "qwen3_omni_moe_thinker", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            RuntimeUnavailable = "the audio and vision towers and multimodal rope",
            TextConfig = text,
        };
    }

    /// <summary>Qwen3OmniMoeAudioEncoder (defaults: Qwen3OmniMoeAudioEncoderConfig; hidden_size etc. are aliases).</summary>
    private static void Audio(TreeBuilder b, ModelConfig a, Layout layout)
    {
        var d = a.FirstInt("d_model", "hidden_size") ?? 1280;
        var layers = a.FirstInt("encoder_layers", "num_hidden_layers") ?? 32;
        var ffn = a.FirstInt("encoder_ffn_dim", "intermediate_size") ?? 5120;
        var mel = a.Positive("num_mel_bins", 128);
        var down = a.Positive("downsample_hidden_size", 480);
        var outDim = a.Positive("output_dim", 3584);
        var actClass = Blocks.ActivationClass(a.String("activation_function", "gelu")!, layout);
        if (d <= 0 || layers < 0 || ffn <= 0) throw new ConfigException("audio_config: d_model, encoder_layers and encoder_ffn_dim must be positive");
        // Three stride-2 convolutions with padding 1 over the mel axis.
        var melOut = (((mel + 1) / 2 + 1) / 2 + 1) / 2;

        using (b.Scope("audio_tower", P + "AudioEncoder", ModuleLocation.Vision))
        {
            b.Leaf("positional_embedding", "SinusoidsPositionEmbedding");
            b.ModuleList("layers", layers, i =>
            {
                using (b.Scope(i.ToString(System.Globalization.CultureInfo.InvariantCulture), P + "AudioEncoderLayer"))
                {
                    Blocks.VisionSelfAttention(b, "self_attn", P + "AudioAttention", d);
                    b.LayerNorm("self_attn_layer_norm", d);
                    b.Leaf("activation_fn", actClass);
                    b.Linear("fc1", d, ffn, true);
                    b.Linear("fc2", ffn, d, true);
                    b.LayerNorm("final_layer_norm", d);
                }
            });
            b.LayerNorm("ln_post", d);
            Conv(b, "conv2d1", "Conv2d", down, 1, 3, 3);
            Conv(b, "conv2d2", "Conv2d", down, down, 3, 3);
            Conv(b, "conv2d3", "Conv2d", down, down, 3, 3);
            b.Linear("conv_out", down * melOut, d);
            b.Linear("proj1", d, d, true);
            b.Leaf("act", actClass);
            b.Linear("proj2", d, outDim, true);
        }
    }

    /// <summary>Qwen3OmniMoeVisionEncoder (defaults: Qwen3OmniMoeVisionEncoderConfig).</summary>
    private static void Vision(TreeBuilder b, ModelConfig v, Layout layout)
    {
        var depth = v.Int("depth", 27);
        var hv = v.Positive("hidden_size", 1152);
        var iv = v.Positive("intermediate_size", 4304);
        var channels = v.Positive("in_channels", 3);
        var patch = v.Positive("patch_size", 16);
        var temporal = v.Positive("temporal_patch_size", 2);
        var merge = v.Positive("spatial_merge_size", 2);
        var outHidden = v.Positive("out_hidden_size", 3584);
        var positions = v.Positive("num_position_embeddings", 2304);
        var deepstack = v.IntList("deepstack_visual_indexes")?.Count ?? 3;
        var actClass = Blocks.ActivationClass(v.String("hidden_act", "gelu_pytorch_tanh")!, layout);
        var merged = hv * merge * merge;

        using (b.Scope("visual", P + "VisionEncoder", ModuleLocation.Vision))
        {
            b.ModuleList("merger_list", deepstack, k => Merger(b, k.ToString(System.Globalization.CultureInfo.InvariantCulture), merged, merged, outHidden));
            using (b.Scope("patch_embed", P + "VisionPatchEmbed"))
                Conv(b, "proj", "Conv3d", hv, channels, temporal, patch, patch);
            b.Embedding("pos_embed", positions, hv, ModuleLocation.Vision);
            b.Leaf("rotary_pos_emb", P + "VisionRotaryEmbedding");
            b.ModuleList("blocks", depth, j =>
            {
                using (b.Scope(j.ToString(System.Globalization.CultureInfo.InvariantCulture), P + "VisionBlock"))
                {
                    b.LayerNorm("norm1", hv);
                    b.LayerNorm("norm2", hv);
                    using (b.Scope("attn", P + "VisionAttention"))
                    {
                        b.Linear("qkv", hv, 3 * hv, true);
                        b.Linear("proj", hv, hv, true);
                    }
                    using (b.Scope("mlp", P + "VisionMLP"))
                    {
                        b.Linear("linear_fc1", hv, iv, true);
                        b.Linear("linear_fc2", iv, hv, true);
                        b.Leaf("act_fn", actClass);
                    }
                }
            });
            Merger(b, "merger", hv, merged, outHidden);
        }
    }

    /// <summary>Qwen3OmniMoeVisionPatchMerger: ln_q (post-shuffle width for the deepstack mergers), Linear, GELU, Linear.</summary>
    private static void Merger(TreeBuilder b, string name, long normWidth, long merged, long outHidden)
    {
        using (b.Scope(name, P + "VisionPatchMerger", ModuleLocation.Projector))
        {
            b.LayerNorm("ln_q", normWidth);
            using (b.Scope("mlp", "ModuleList"))
            {
                b.Linear("0", merged, merged, true);
                b.Leaf("1", "GELU");
                b.Linear("2", merged, outHidden, true);
            }
        }
    }

    /// <summary>An nn.Conv2d / nn.Conv3d with bias: weight [out, in, *kernel], bias [out]; PEFT's all-linear skips it.</summary>
    private static void Conv(TreeBuilder b, string name, string className, long outChannels, long inChannels, params long[] kernel)
    {
        using (b.Scope(name, className, kind: ModuleKind.Other))
        {
            b.Param("weight", [outChannels, inChannels, .. kernel]);
            b.Param("bias", outChannels);
        }
    }
}
