using System.Text.Json.Nodes;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// GLM-5.3-Flash (<c>glm5_next</c>, Glm5NextForConditionalGeneration): <c>model.visual</c> (a GLM-4V-style vision
/// tower), <c>model.language_model</c> (the text model) and <c>lm_head</c> at the root. Text layers are Kimi-style
/// linear attention (KDA) or, for "deepseek_sparse_attention" (legacy "full_attention"), NoPE MLA with a DSA indexer
/// (default: every 4th layer, i % 4 == 3); the feed-forward is DeepSeek-V3's MoE block (experts without an act_fn
/// child, a sigmoid TopK router whose <c>e_score_correction_bias</c> is a persistent buffer, one shared-experts MLP
/// of <c>moe_intermediate_size · n_shared_experts</c>) on <c>mlp_layer_types</c> "sparse" layers (default: all but
/// the first 3); every layer has mHC hyper-connections <c>attn_hc</c> / <c>ffn_hc</c> (fn [(2+m)·m, m·H],
/// base [(2+m)·m], scale [3], m = hc_mult) and the model ends with a parameter-less <c>hc_head</c>. No rotary module.
/// <para>
/// Glm5NextTextConfig rejects qk_rope_head_dim &gt; 0, a missing q_lora_rank and num_key_value_heads ≠ heads; its
/// <c>linear_attn_config</c> dict overrides the linear_* fields and <c>index_topk_pattern</c> ("FSSF…") /
/// <c>index_topk_freq</c> / <c>index_skip_topk_offset</c> (plain kwargs) give the indexer layout when
/// <c>indexer_types</c> is absent; the text fields may also sit at the top level (flat checkpoints).
/// </para>
/// <para>
/// v4 means the on-disk checkpoint layout (glm5_next is not in transformers 4.57; module classes reuse the v5 names):
/// per-expert <c>mlp.experts.{e}.gate_proj/up_proj/down_proj</c>, the forget gate's tensors directly on self_attn,
/// q/k/v_conv1d [Q, 1, K] instead of one conv1d, and the hyper-connection tensors on the layer as
/// hc_attn_fn/base/scale and hc_ffn_fn/base/scale.
/// </para>
/// </summary>
internal sealed class Glm5NextFamily : IArchitecture
{
    private const string T = "Glm5NextText";

    public IReadOnlyList<string> ModelTypes => ["glm5_next"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var text = c.Sub("text_config") ?? c;
        var vision = Blocks.SubOrDefaults(c, "vision_config");

        // Defaults: Glm5NextTextConfig.
        var vocab = text.Positive("vocab_size", 154880);
        var hidden = text.Positive("hidden_size", 4096);
        var inter = text.Positive("intermediate_size", 12288);
        var moeInter = text.Positive("moe_intermediate_size", 2048);
        var layers = text.Positive("num_hidden_layers", 45);
        var heads = text.Positive("num_attention_heads", 64);
        var kv = text.IntOrNull("num_key_value_heads", 64) ?? heads;
        if (kv != heads) throw new ConfigException($"glm5_next needs num_key_value_heads ({kv}) == num_attention_heads ({heads})");
        var shared = text.Int("n_shared_experts", 1);
        var experts = text.FirstInt("n_routed_experts", "num_local_experts") ?? 288;
        var topK = text.Positive("num_experts_per_tok", 8);
        var kvLoraRank = text.Positive("kv_lora_rank", 512);
        var qLoraRank = text.IntOrNull("q_lora_rank", 1536)
            ?? throw new ConfigException("glm5_next needs 'q_lora_rank' (its DSA attention layers require it)");
        var rope = text.Int("qk_rope_head_dim", 0);
        if (rope > 0) throw new ConfigException($"glm5_next expects NoPE attention, but qk_rope_head_dim is {rope}");
        var nope = text.Positive("qk_nope_head_dim", 256);
        var vHead = text.Positive("v_head_dim", 256);
        var indexHeadDim = text.Positive("index_head_dim", 128);
        var indexHeads = text.Positive("index_n_heads", 32);
        var indexKpool = text.Positive("index_kpool", 16);
        var hcMult = text.Positive("hc_mult", 4);
        var bias = text.Bool("attention_bias", false);
        var act = text.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var tie = c.Bool("tie_word_embeddings", false);

        var linear = text.Sub("linear_attn_config");
        var linHeadDim = linear?.IntOrNull("head_dim", null) ?? text.Positive("linear_head_dim", 128);
        var linHeads = linear?.IntOrNull("num_heads", null) ?? text.Positive("linear_num_heads", 64);
        var convK = linear?.IntOrNull("short_conv_kernel_size", null) ?? text.Positive("linear_conv_kernel_dim", 4);

        var mlpTypes = text.StringList("mlp_layer_types")
            ?? Enumerable.Range(0, (int)layers).Select(i => i < 3 ? "dense" : "sparse").ToList();
        var layerTypes = text.StringList("layer_types")
            ?? Enumerable.Range(0, (int)layers).Select(i => i % 4 != 3 ? "linear_attention" : "deepseek_sparse_attention").ToList();
        var indexerTypes = IndexerTypes(text, layers);
        if (mlpTypes.Count < layers || layerTypes.Count < layers || indexerTypes.Count < layers)
            throw new ConfigException($"glm5_next: mlp_layer_types, layer_types and indexer_types need {layers} entries");

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers, i => mlpTypes[i] == "sparse");
        var moeSet = moeLayers.ToHashSet();
        var sharedInter = moeInter * shared;
        var v5 = layout == Layout.V5;
        var q = linHeads * linHeadDim;

        var b = new TreeBuilder("Glm5NextForConditionalGeneration", layout);
        using (b.Scope("model", "Glm5NextModel"))
        {
            Vision(b, vision, layout);
            using (b.Scope("language_model", T + "Model"))
            {
                b.Embedding("embed_tokens", vocab, hidden);
                b.ModuleList("layers", layers, i =>
                {
                    using (b.Scope(i.ToString(System.Globalization.CultureInfo.InvariantCulture), T + "DecoderLayer", ModuleLocation.Other, layer: i))
                    {
                        if (layerTypes[i] == "linear_attention")
                            LinearAttention(b, v5, hidden, q, linHeadDim, linHeads, convK);
                        else
                            Attention(b, hidden, heads, qLoraRank, kvLoraRank, nope, vHead, bias, indexerTypes[i] != "shared",
                                indexHeads, indexHeadDim, indexKpool);
                        if (moeSet.Contains(i))
                        {
                            using (b.Scope("mlp", T + "MoE", ModuleLocation.Other))
                            {
                                if (v5)
                                {
                                    using (b.Scope("experts", T + "Experts", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts, numExperts: experts))
                                    {
                                        b.Param("gate_up_proj", experts, 2 * moeInter, hidden);
                                        b.Param("down_proj", experts, hidden, moeInter);
                                    }
                                }
                                else
                                {
                                    Blocks.PerExpertMlps(b, "ModuleList", T + "MLP", experts, hidden, moeInter, actClass);
                                }
                                Blocks.TopKRouter(b, "gate", T + "TopkRouter", experts, hidden);
                                Blocks.GatedMlp(b, "shared_experts", T + "MLP", hidden, sharedInter, false, actClass, ModuleLocation.SharedExpert);
                            }
                        }
                        else
                        {
                            Blocks.GatedMlp(b, "mlp", T + "MLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
                        }
                        b.RmsNorm("input_layernorm", T + "RMSNorm", hidden, ModuleLocation.Norm);
                        b.RmsNorm("post_attention_layernorm", T + "RMSNorm", hidden, ModuleLocation.Norm);
                        var mix = (2 + hcMult) * hcMult;
                        foreach (var (name, saved) in (ReadOnlySpan<(string, string)>)[("attn_hc", "hc_attn_"), ("ffn_hc", "hc_ffn_")])
                        {
                            if (v5)
                            {
                                using (b.Scope(name, T + "HyperConnection", kind: ModuleKind.Other))
                                {
                                    b.Param("fn", mix, hcMult * hidden);
                                    b.Param("base", mix);
                                    b.Param("scale", 3);
                                    b.Leaf("input_norm", T + "UnweightedRMSNorm");
                                }
                            }
                            else
                            {
                                b.Param(saved + "fn", mix, hcMult * hidden);
                                b.Param(saved + "base", mix);
                                b.Param(saved + "scale", 3);
                            }
                        }
                    }
                });
                b.RmsNorm("norm", T + "RMSNorm", hidden, ModuleLocation.Norm);
                b.Leaf("hc_head", T + "HyperHead");
            }
        }
        b.Linear("lm_head", hidden, vocab, location: ModuleLocation.LmHead,
            tiedWeightTo: tie ? "model.language_model.embed_tokens.weight" : null);

        var routing = $"sigmoid scores + e_score_correction_bias, group-limited ({text.Int("n_group", 1)} groups, top " +
            $"{text.Int("topk_group", 1)}), top-{topK} of {experts}" + (text.Bool("norm_topk_prob", true) ? ", renormalised" : "") +
            $", scaled by {text.Double("routed_scaling_factor", 2.5)}, plus {shared} shared expert(s)";
        var moe = moeLayers.Count == 0 ? MoeFacts.Dense(layers)
            : new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers, routing);
        return Blocks.Spec(c, "glm5_next", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            RuntimeUnavailable = "linear attention and hyper-connections",
            TextConfig = text,
            DecoderLayersPath = "model.language_model.layers",
            InputEmbeddings = "model.language_model.embed_tokens",
        };
    }

    /// <summary>indexer_types, else index_topk_pattern ("F"/"S" per layer), else the index_topk_freq / offset schedule.</summary>
    private static IReadOnlyList<string> IndexerTypes(ModelConfig text, long layers)
    {
        if (text.StringList("indexer_types") is { } given) return given;
        if (text.Json.TryGetPropertyValue("index_topk_pattern", out var p) && p is not null)
        {
            if (p is JsonValue pv && pv.TryGetValue<string>(out var s))
                return s.Select(ch => ch switch
                {
                    'F' => "full",
                    'S' => "shared",
                    _ => throw new ConfigException($"config field 'index_topk_pattern' may only hold F and S, got '{ch}'"),
                }).ToList();
            return text.StringList("index_topk_pattern")!;
        }
        var freq = Math.Max(text.Int("index_topk_freq", 1), 1);
        var offset = text.Int("index_skip_topk_offset", 2);
        return Enumerable.Range(0, (int)layers).Select(i => Math.Max(i - offset + 1, 0) % freq == 0 ? "full" : "shared").ToList();
    }

    /// <summary>Glm5NextTextAttention: NoPE MLA plus, on "full" indexer layers, a DSA indexer with its own pooling tensors.</summary>
    private static void Attention(TreeBuilder b, long hidden, long heads, long qLoraRank, long kvLoraRank, long nope, long vHead,
        bool bias, bool indexer, long indexHeads, long indexHeadDim, long kpool)
    {
        using (b.Scope("self_attn", T + "Attention", ModuleLocation.Attention))
        {
            b.Linear("q_a_proj", hidden, qLoraRank, bias);
            b.RmsNorm("q_a_layernorm", T + "RMSNorm", qLoraRank);
            b.Linear("q_b_proj", qLoraRank, heads * nope);
            b.Linear("kv_a_proj_with_mqa", hidden, kvLoraRank, bias);
            b.RmsNorm("kv_a_layernorm", T + "RMSNorm", kvLoraRank);
            b.Linear("kv_b_proj", kvLoraRank, heads * (nope + vHead));
            b.Linear("o_proj", heads * vHead, hidden, bias);
            if (!indexer) return;
            using (b.Scope("indexer", T + "Indexer"))
            {
                b.Param("index_kpool_compress_ape", kpool, indexHeadDim);
                b.Param("index_kpool_compress_gate", indexHeadDim, hidden);
                b.Linear("wq_b", qLoraRank, indexHeads * indexHeadDim);
                b.Linear("wk", hidden, indexHeadDim);
                b.LayerNorm("k_norm", indexHeadDim);
                b.Linear("weights_proj", hidden, indexHeads);
            }
        }
    }

    /// <summary>Glm5NextTextLinearAttention (KDA); the depthwise convolutions are ModuleKind.Other (never all-linear).</summary>
    private static void LinearAttention(TreeBuilder b, bool v5, long hidden, long q, long headDim, long heads, long convK)
    {
        using (b.Scope("self_attn", T + "LinearAttention", ModuleLocation.Attention))
        {
            b.Linear("q_proj", hidden, q);
            b.Linear("k_proj", hidden, q);
            b.Linear("v_proj", hidden, q);
            if (v5)
            {
                using (b.Scope("conv1d", "Conv1d", kind: ModuleKind.Other))
                    b.Param("weight", 3 * q, 1, convK);
                using (b.Scope("forget_gate", T + "ForgetGate"))
                {
                    b.Param("dt_bias", q);
                    b.Param("A_log", heads);
                    b.Linear("f_a_proj", hidden, headDim);
                    b.Linear("f_b_proj", headDim, q);
                }
            }
            else
            {
                b.Param("dt_bias", q);
                b.Param("A_log", heads);
                foreach (var name in (string[])["q_conv1d", "k_conv1d", "v_conv1d"])
                {
                    using (b.Scope(name, "Conv1d", kind: ModuleKind.Other))
                        b.Param("weight", q, 1, convK);
                }
                b.Linear("f_a_proj", hidden, headDim);
                b.Linear("f_b_proj", headDim, q);
            }
            b.Linear("b_proj", hidden, heads);
            b.Linear("g_a_proj", hidden, headDim);
            b.Linear("g_b_proj", headDim, q);
            b.RmsNorm("o_norm", T + "RMSNormGated", headDim);
            b.Linear("o_proj", q, hidden);
        }
    }

    /// <summary>Glm5NextVisionModel (defaults: Glm5NextVisionConfig), all <see cref="ModuleLocation.Vision"/> but the merger.</summary>
    private static void Vision(TreeBuilder b, ModelConfig v, Layout layout)
    {
        var depth = v.Int("depth", 24);
        var hv = v.Positive("hidden_size", 1024);
        var iv = v.Positive("intermediate_size", 4096);
        var vHeads = v.FirstInt("num_heads", "num_attention_heads") ?? 16;
        var channels = v.Positive("in_channels", 3);
        var patch = v.Positive("patch_size", 14);
        var temporal = v.Positive("temporal_patch_size", 2);
        var merge = v.Positive("spatial_merge_size", 2);
        var outHidden = v.Positive("out_hidden_size", 1536);
        var projInter = v.Positive("projection_intermediate_size", 10240);
        var bias = v.Bool("attention_bias", true);
        var actClass = Blocks.ActivationClass(v.String("hidden_act", "silu")!, layout);
        if (vHeads <= 0 || hv % vHeads != 0) throw new ConfigException($"vision_config: num_heads ({vHeads}) must divide hidden_size ({hv})");
        var headDim = hv / vHeads;

        using (b.Scope("visual", "Glm5NextVisionModel", ModuleLocation.Vision))
        {
            using (b.Scope("patch_embed", "Glm5NextVisionPatchEmbed"))
            using (b.Scope("proj", "Conv3d", kind: ModuleKind.Other))
            {
                b.Param("weight", hv, channels, temporal, patch, patch);
                b.Param("bias", hv);
            }
            b.Leaf("rotary_pos_emb", "Glm5NextVisionRotaryEmbedding");
            b.ModuleList("blocks", depth, j =>
            {
                using (b.Scope(j.ToString(System.Globalization.CultureInfo.InvariantCulture), "Glm5NextVisionBlock"))
                {
                    b.RmsNorm("norm1", "Glm5NextRMSNorm", hv);
                    b.RmsNorm("norm2", "Glm5NextRMSNorm", hv);
                    using (b.Scope("attn", "Glm5NextVisionAttention"))
                    {
                        b.Linear("qkv", hv, 3 * hv, bias);
                        b.Linear("proj", hv, hv, bias);
                        b.RmsNorm("q_norm", "Glm5NextRMSNorm", headDim);
                        b.RmsNorm("k_norm", "Glm5NextRMSNorm", headDim);
                    }
                    Blocks.GatedMlp(b, "mlp", "Glm5NextVisionMLP", hv, iv, bias, actClass, ModuleLocation.Vision);
                }
            });
            using (b.Scope("merger", "Glm5NextVisionPatchMerger", ModuleLocation.Projector))
            {
                b.Linear("proj", outHidden, outHidden);
                b.LayerNorm("post_projection_norm", outHidden);
                b.Linear("gate_proj", outHidden, projInter);
                b.Linear("up_proj", outHidden, projInter);
                b.Linear("down_proj", projInter, outHidden);
                b.Leaf("act1", "GELU");
                b.Leaf("act_fn", actClass);
            }
            using (b.Scope("downsample", "Conv2d", kind: ModuleKind.Other))
            {
                b.Param("weight", outHidden, hv, merge, merge);
                b.Param("bias", outHidden);
            }
            b.RmsNorm("post_layernorm", "Glm5NextRMSNorm", hv);
        }
    }
}
