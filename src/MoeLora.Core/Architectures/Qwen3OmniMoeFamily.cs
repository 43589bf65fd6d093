using MoeLora.Core.Architectures.Runtime;
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
        var text = Blocks.SubOrDefaults(c, "text_config");

        // Defaults: Qwen3OmniMoeTextConfig.
        var vocab = text.Positive("vocab_size", 3584);
        var hidden = text.Positive("hidden_size", 2048);
        var inter = text.Positive("intermediate_size", 18944);
        var layers = text.Positive("num_hidden_layers", 28);
        var heads = text.Positive("num_attention_heads", 28);
        var kv = text.Positive("num_key_value_heads", 4);
        var headDim = Blocks.HeadDim(text, hidden, heads);
        var moeInter = text.Positive("moe_intermediate_size", 768);
        var topK = text.Positive("num_experts_per_tok", 8);
        var experts = text.Int("num_experts", 128);
        var bias = text.Bool("attention_bias", false);
        var act = text.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        // Qwen3OmniMoeThinkerConfig declares tie_word_embeddings (default False); the text config does not.
        var tie = c.Bool("tie_word_embeddings", false);

        var (moeLayers, denseLayers) = QwenMoeFamily.MoeLayers(text, layers, experts);
        var moeSet = moeLayers.ToHashSet();
        var dims = new QwenMoeFamily.LayerDims(hidden, heads, kv, headDim, bias, bias, inter, experts, moeInter, 0, actClass);

        var b = new TreeBuilder(P + "ThinkerForConditionalGeneration", layout);
        Audio(b, Blocks.SubOrDefaults(c, "audio_config"), layout);
        Vision(b, Blocks.SubOrDefaults(c, "vision_config"), layout);
        Blocks.CausalLm(b, T, vocab, hidden, layers, tie, i => QwenMoeFamily.Layer(b, T, qwen3: true, layout, dims, moeSet.Contains(i), "ModuleList"),
            normClass: "Qwen3OmniMoeTextRMSNorm");

        var normTopK = text.Bool("norm_topk_prob", true);
        var routing = $"softmax over {experts} experts, top-{topK}" + (normTopK ? ", renormalised" : "");
        var moe = moeLayers.Count == 0 ? MoeFacts.Dense(layers)
            : new MoeFacts(experts, topK, 0, moeInter, 0, moeLayers, denseLayers, routing);
        // Runtime: text only, as transformers runs the thinker given only input_ids. The audio and vision towers are
        // never called; without image, video or audio grids get_rope_index gives all three mrope sections the positions
        // cumsum(attention_mask) - 1, which is plain rope over head_dim (the interleaved sections pick every frequency
        // from identical tables) shifted on a left-padded row by its padding: rope depends on position differences
        // only, so the real tokens' outputs are the text decoder's (padded positions, which no loss reads, differ).
        // The decoder is Qwen3-MoE's (experts registered before the router, per-head q/k norms, no sliding window).
        var runtime = QwenMoeFamily.Runtime(text, qwen3: true, vocab, hidden, inter, layers, heads, kv, headDim, bias, bias,
            experts, topK, normTopK, moeInter, sharedInter: 0, act, tie, moeSet, defaultTheta: 1_000_000.0);
        return Blocks.Spec(c, "qwen3_omni_moe_thinker", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            Runtime = runtime with { Towers = InertTowers.Before(["audio_tower", "visual"], "model", "lm_head") },
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

    /// <summary>Qwen3OmniMoeVisionEncoder: the Qwen3-VL tower, its deepstack mergers registered first as merger_list.</summary>
    private static void Vision(TreeBuilder b, ModelConfig v, Layout layout)
    {
        var t = Blocks.QwenVisionDims.Read(v, layout);
        using (b.Scope("visual", P + "VisionEncoder", ModuleLocation.Vision))
        {
            b.ModuleList("merger_list", t.Deepstack, k => Merger(b, k.ToString(System.Globalization.CultureInfo.InvariantCulture), t.Merged, t.Merged, t.OutHidden));
            Blocks.QwenVisionBody(b, P, t);
            Merger(b, "merger", t.Hidden, t.Merged, t.OutHidden);
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
