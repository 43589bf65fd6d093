using System.Globalization;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// DeepSeek-V4 (<c>deepseek_v4</c>). Attention is a single-KV-head MQA on a q LoRA (q_a_proj, q_a_norm, q_b_proj, an
/// unweighted q_b_norm, kv_proj, kv_norm), a grouped output projection (<c>o_a_proj</c>, an nn.Linear subclass of
/// <c>o_groups</c> blocks, then o_b_proj) and learned <c>sinks</c>; per <c>layer_types</c> a layer also compresses its
/// KV: heavily compressed (HCA) or compressed sparse (CSA, with a lightning indexer) attention, none for sliding
/// attention. Every layer is MoE: hash-routed (<c>hash_moe</c>: experts fixed per token id by the persistent
/// <c>tid2eid</c> buffer) or top-k routed with <c>e_score_correction_bias</c>, plus one shared expert of
/// <c>moe_intermediate_size</c> (n_shared_experts is not read). Manifold hyper-connections (<c>attn_hc</c>,
/// <c>ffn_hc</c>, <c>model.hc_head</c>) mix <c>hc_mult</c> residual streams. DeepSeek-V4 did not exist in transformers
/// 4.57: <see cref="Layout.V4"/> means the on-disk checkpoint layout, the reference implementation's names
/// (<c>attn.wq_a</c>, <c>ffn.experts.{e}.w1/w2/w3</c>, <c>hc_attn_fn</c>, <c>head</c>, ...), as save_pretrained
/// writes them.
/// <para>
/// Runtime: <see cref="DeepseekV4AttentionSettings"/> (sliding-window MQA with the HCA/CSA compressors and the lightning
/// indexer, grouped output projection, sinks), <see cref="ScoreFunctionRouterSettings"/> (hash and top-k routers) with
/// clamped SwiGLU experts and shared expert, inside <see cref="HyperConnectionSettings"/> with the Sinkhorn stream mix;
/// refused for a rope width beyond head_dim or index_head_dim, o_groups that do not split the heads, another hidden_act than silu, or a
/// scoring_func other than sqrtsoftplus and sigmoid. LoRA cannot target o_a_proj (PEFT's LoRA output does not fit its
/// per-group shape).
/// </para>
/// </summary>
internal sealed class DeepseekV4Family : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["deepseek_v4"];

    /// <summary>The shapes one layer needs (defaults: DeepseekV4Config, 5.17).</summary>
    private sealed record Shape(long Hidden, long Heads, long HeadDim, long QLoraRank, long OGroups, long OLoraRank,
        long IndexHeads, long IndexHeadDim, long CsaRate, long HcaRate, long HcMult, long Experts, long TopK, long MoeInter,
        long Vocab, string ActClass, string ScoreClass);

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var layers = c.Positive("num_hidden_layers", 43);
        var rates = c.Sub("compress_rates");
        var act = c.String("hidden_act", "silu")!;
        var scoring = c.String("scoring_func", "sqrtsoftplus")!;
        var s = new Shape(
            Hidden: c.Positive("hidden_size", 4096),
            Heads: c.Positive("num_attention_heads", 64),
            HeadDim: c.Positive("head_dim", 512),
            QLoraRank: c.Positive("q_lora_rank", 1024),
            OGroups: c.Positive("o_groups", 8),
            OLoraRank: c.Positive("o_lora_rank", 1024),
            IndexHeads: c.Positive("index_n_heads", 64),
            IndexHeadDim: c.Positive("index_head_dim", 128),
            CsaRate: c.FirstInt("compress_rate_csa") ?? rates?.Int("compressed_sparse_attention", 4) ?? 4,
            HcaRate: c.FirstInt("compress_rate_hca") ?? rates?.Int("heavily_compressed_attention", 128) ?? 128,
            HcMult: c.Positive("hc_mult", 4),
            Experts: c.FirstInt("n_routed_experts", "num_local_experts") ?? 256,
            TopK: c.Positive("num_experts_per_tok", 6),
            MoeInter: c.FirstInt("moe_intermediate_size", "intermediate_size") ?? 2048,
            Vocab: c.Positive("vocab_size", 129280),
            ActClass: Blocks.ActivationClass(act, layout),
            ScoreClass: scoring switch { "sqrtsoftplus" => "SqrtSoftplusActivation", "sigmoid" => "Sigmoid", "softplus" => "Softplus", _ => scoring });
        var layerTypes = LayerTypes(c, layers);
        var hashLayers = MlpLayerTypes(c, layers);
        var tie = c.Bool("tie_word_embeddings", false);

        var b = new TreeBuilder("DeepseekV4ForCausalLM", layout);
        if (layout == Layout.V5)
        {
            Blocks.DecoderStack(b, "model", "DeepseekV4Model", "DeepseekV4DecoderLayer", "DeepseekV4RMSNorm", "DeepseekV4RotaryEmbedding",
                s.Vocab, s.Hidden, layers, i => Layer(b, s, layerTypes[i], hashLayers[i]), after: () =>
                {
                    using (b.Scope("hc_head", "DeepseekV4HyperHead"))
                    {
                        b.Param("hc_fn", s.HcMult, s.HcMult * s.Hidden);
                        b.Param("hc_base", s.HcMult);
                        b.Param("hc_scale", 1);
                        b.Leaf("input_norm", "DeepseekV4UnweightedRMSNorm");
                    }
                });
            b.Linear("lm_head", s.Hidden, s.Vocab, location: ModuleLocation.LmHead, tiedWeightTo: tie ? "model.embed_tokens.weight" : null);
        }
        else
        {
            Checkpoint(b, s, layers, layerTypes, hashLayers, tie);
        }

        var moeLayers = Enumerable.Range(0, (int)layers).ToList();
        var hashCount = hashLayers.Count(h => h);
        var routing = $"{scoring} scores; " + (hashCount > 0 ? $"{hashCount} hash-routed layers pick experts by token id (tid2eid), the rest " : "") +
            $"top-{s.TopK} of {s.Experts} on scores + e_score_correction_bias (selection only); renormalised, scaled by " +
            c.Double("routed_scaling_factor", 1.5).ToString(CultureInfo.InvariantCulture);
        var moe = new MoeFacts(s.Experts, s.TopK, 1, s.MoeInter, s.MoeInter, moeLayers, [], routing);
        var spec = Blocks.Spec(c, "deepseek_v4", b.Build(), moe, s.Hidden, layers, s.Vocab, s.Heads, c.Int("num_key_value_heads", 1), tie, act);
        // int(head_dim · partial_rotary_factor) frequencies' dims: the rotation covers one pair per frequency (odd widths round up).
        var ropeDim = (long)(s.HeadDim * PartialRotaryFactor(c, s.HeadDim));
        var rotated = 2 * ((ropeDim + 1) / 2);
        if (ropeDim <= 0 || rotated > s.HeadDim || rotated > s.IndexHeadDim)
            return spec with { RuntimeUnavailable = $"a rope width of {rotated} (it must fit head_dim {s.HeadDim} and index_head_dim {s.IndexHeadDim})" };
        if (s.Heads * s.HeadDim % s.OGroups != 0)
            return spec with { RuntimeUnavailable = $"o_groups {s.OGroups} that do not split {s.Heads} heads of {s.HeadDim}" };
        if (act != "silu")
            return spec with { RuntimeUnavailable = $"hidden_act '{act}' (DeepseekV4Experts' clamped SwiGLU is run for silu only)" };
        RouterScoreFunction? score = scoring switch { "sqrtsoftplus" => RouterScoreFunction.SqrtSoftplus, "sigmoid" => RouterScoreFunction.Sigmoid, _ => null };
        if (score is null)
            return spec with { RuntimeUnavailable = $"scoring_func '{scoring}' (sqrtsoftplus and sigmoid run)" };
        return spec with { Runtime = Runtime(c, s, layerTypes, hashLayers, tie, ropeDim, score.Value, layers) };
    }

    /// <summary>
    /// What DeepseekV4ForCausalLM computes (eager attention, the only one it supports): per layer the sliding-window
    /// attention with its HCA/CSA compressor (<see cref="DeepseekV4AttentionSettings"/>), the MoE block (router, fused
    /// experts with the clamped SwiGLU, a clamped shared expert), both inside Sinkhorn-mixed hyper-connections.
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig c, Shape s, List<string> layerTypes, List<bool> hashLayers, bool tie, long ropeDim,
        RouterScoreFunction score, long layers)
    {
        var eps = c.Double("rms_norm_eps", 1e-6);
        var norm = new NormSettings(NormKind.Rms, eps);
        var (main, compress) = Ropes(c, ropeDim);
        var window = c.Positive("sliding_window", 128);
        var limit = c.Double("swiglu_limit", 10.0);
        var scale = c.Double("routed_scaling_factor", 1.5);
        var indexer = new LightningIndexerSettings(s.IndexHeads, s.IndexHeadDim, c.Positive("index_topk", 512));
        var experts = new ExpertsSettings(ExpertsLayout.GateUpOutInClamped, s.Experts, s.MoeInter, "silu", SwigluLimit: limit, SwigluAlpha: 1.0,
            SwigluUpShift: 0.0);
        var shared = new SharedExpertSettings("shared_experts", s.MoeInter, "silu", SigmoidGateName: null, ClampLimit: limit);
        var runtimeLayers = Enumerable.Range(0, (int)layers).Select(i =>
        {
            var type = layerTypes[i];
            KvCompressorSettings? compressor = type switch
            {
                "heavily_compressed_attention" => new KvCompressorSettings(s.HcaRate, null),
                "compressed_sparse_attention" => new KvCompressorSettings(s.CsaRate, indexer),
                _ => null,
            };
            var attention = new DeepseekV4AttentionSettings(s.Heads, s.HeadDim, s.QLoraRank, s.OGroups, s.OLoraRank, ropeDim,
                compressor is null ? main : compress, window, eps, compressor);
            var router = new ScoreFunctionRouterSettings("gate", s.Experts, s.TopK, score, scale, hashLayers[i] ? s.Vocab : null);
            return new DecoderLayerRuntime(attention, "mlp", new MoeSettings(router, experts, shared, MoeOrder.RouterFirst), norm, norm);
        }).ToList();
        var hc = new HyperConnectionSettings(s.HcMult, c.Double("hc_eps", 1e-6), eps, PostMagnitude: 2.0,
            SinkhornIterations: c.Positive("hc_sinkhorn_iters", 20));
        return new DecoderRuntime(s.Vocab, s.Hidden, tie, c.Double("initializer_range", 0.02), norm, main, runtimeLayers, HyperConnections: hc);
    }

    /// <summary>partial_rotary_factor: the field, else the legacy qk_rope_head_dim / head_dim, else 64 / 512.</summary>
    private static double PartialRotaryFactor(ModelConfig c, long headDim) =>
        c.Has("partial_rotary_factor") ? c.Double("partial_rotary_factor", 0.125)
            : c.Has("qk_rope_head_dim") ? c.Double("qk_rope_head_dim", 64) / headDim : 64.0 / 512.0;

    /// <summary>
    /// The "main" (sliding layers) and "compress" (compressed layers, their compressors and indexers) ropes: the nested
    /// <c>rope_parameters.main</c> / <c>.compress</c> a saved config holds, else as DeepseekV4Config.__post_init__ builds
    /// them: main the default rope of rope_theta, compress the given scaling (yarn with attention_factor 1 unless set)
    /// at compress_rope_theta.
    /// </summary>
    private static (RopeSettings Main, RopeSettings Compress) Ropes(ModelConfig c, long dim)
    {
        var theta = c.Double("rope_theta", 10000.0);
        var compressTheta = c.Double("compress_rope_theta", 160000.0);
        var rp = c.Sub("rope_parameters") ?? c.Sub("rope_scaling");
        if (rp?.Sub("main") is { } m && rp.Sub("compress") is { } k)
            return (RopeSettings.Of(m, m.Double("rope_theta", theta), dim), RopeSettings.Of(k, k.Double("rope_theta", compressTheta), dim));
        var compress = RopeSettings.Of(rp, compressTheta, dim);
        if (compress.Type == "yarn") compress = compress with { AttentionFactor = compress.AttentionFactor ?? 1.0 };
        return (new RopeSettings("default", theta, dim), compress);
    }

    /// <summary>layer_types: given, else the legacy per-layer compress_ratios (0/4/128), else 2 HCA then CSA/HCA alternating.</summary>
    private static List<string> LayerTypes(ModelConfig c, long layers)
    {
        var types = c.StringList("layer_types")?.ToList()
            ?? c.IntList("compress_ratios")?.Select(r => r switch
            {
                0 => "sliding_attention",
                4 => "compressed_sparse_attention",
                128 => "heavily_compressed_attention",
                _ => throw new ConfigException($"config field 'compress_ratios' may hold only 0, 4 and 128, got {r}"),
            }).ToList()
            ?? Enumerable.Range(0, (int)layers).Select(i => i < 2 || (i - 2) % 2 == 0 ? "heavily_compressed_attention" : "compressed_sparse_attention").ToList();
        if (types.Count < layers) throw new ConfigException($"config field 'layer_types' has {types.Count} entries for {layers} layers");
        return types;
    }

    /// <summary>Per layer: hash-routed? mlp_layer_types ("hash_moe"/"moe"), else the first num_hash_layers (default 3).</summary>
    private static List<bool> MlpLayerTypes(ModelConfig c, long layers)
    {
        var types = c.StringList("mlp_layer_types");
        if (types is null)
        {
            var hash = c.Int("num_hash_layers", 3);
            return Enumerable.Range(0, (int)layers).Select(i => i < hash).ToList();
        }
        if (types.Count < layers) throw new ConfigException($"config field 'mlp_layer_types' has {types.Count} entries for {layers} layers");
        return types.Select(t => t == "hash_moe").ToList();
    }

    private static void Layer(TreeBuilder b, Shape s, string layerType, bool hash)
    {
        using (b.Scope("self_attn", "DeepseekV4Attention", ModuleLocation.Attention))
        {
            b.Param("sinks", s.Heads);
            b.Linear("q_a_proj", s.Hidden, s.QLoraRank);
            b.RmsNorm("q_a_norm", "DeepseekV4RMSNorm", s.QLoraRank);
            b.Linear("q_b_proj", s.QLoraRank, s.Heads * s.HeadDim);
            b.Leaf("q_b_norm", "DeepseekV4UnweightedRMSNorm");
            b.Linear("kv_proj", s.Hidden, s.HeadDim);
            b.RmsNorm("kv_norm", "DeepseekV4RMSNorm", s.HeadDim);
            b.Linear("o_a_proj", s.Heads * s.HeadDim / s.OGroups, s.OGroups * s.OLoraRank, className: "DeepseekV4GroupedLinear");
            b.Linear("o_b_proj", s.OGroups * s.OLoraRank, s.Hidden);
            if (layerType != "sliding_attention")
            {
                var csa = layerType == "compressed_sparse_attention";
                using (b.Scope("compressor", csa ? "DeepseekV4CSACompressor" : "DeepseekV4HCACompressor"))
                {
                    Compressor(b, s.Hidden, csa ? 2 * s.HeadDim : s.HeadDim, s.HeadDim, csa ? s.CsaRate : s.HcaRate);
                    if (csa)
                    {
                        using (b.Scope("indexer", "DeepseekV4Indexer"))
                        {
                            Compressor(b, s.Hidden, 2 * s.IndexHeadDim, s.IndexHeadDim, s.CsaRate, () =>
                                b.Linear("q_b_proj", s.QLoraRank, s.IndexHeads * s.IndexHeadDim));
                            using (b.Scope("scorer", "DeepseekV4IndexerScorer"))
                                b.Linear("weights_proj", s.Hidden, s.IndexHeads);
                        }
                    }
                }
            }
        }
        using (b.Scope("mlp", "DeepseekV4SparseMoeBlock", ModuleLocation.Other))
        {
            using (b.Scope("gate", hash ? "DeepseekV4HashRouter" : "DeepseekV4TopKRouter", ModuleLocation.Router, kind: ModuleKind.Router))
            {
                b.Param("weight", s.Experts, s.Hidden);
                b.Leaf("score_fn", s.ScoreClass);
                if (hash) b.Buffer("tid2eid", s.Vocab, s.TopK);
                else b.Buffer("e_score_correction_bias", s.Experts);
            }
            Blocks.FusedExperts(b, "DeepseekV4Experts", s.Experts, s.Hidden, s.MoeInter, s.ActClass);
            Blocks.GatedMlp(b, "shared_experts", "DeepseekV4MLP", s.Hidden, s.MoeInter, false, s.ActClass, ModuleLocation.SharedExpert);
        }
        b.RmsNorm("input_layernorm", "DeepseekV4RMSNorm", s.Hidden, ModuleLocation.Norm);
        b.RmsNorm("post_attention_layernorm", "DeepseekV4RMSNorm", s.Hidden, ModuleLocation.Norm);
        foreach (var name in new[] { "attn_hc", "ffn_hc" })
        {
            using (b.Scope(name, "DeepseekV4HyperConnection"))
            {
                var mix = (2 + s.HcMult) * s.HcMult;
                b.Param("fn", mix, s.HcMult * s.Hidden);
                b.Param("base", mix);
                b.Param("scale", 3);
                b.Leaf("input_norm", "DeepseekV4UnweightedRMSNorm");
            }
        }
    }

    /// <summary>A KV compressor's own modules: kv_proj, gate_proj ([width, H]), position_bias [rate, width], kv_norm, rotary.</summary>
    private static void Compressor(TreeBuilder b, long hidden, long width, long normDim, long rate, Action? beforeRotary = null)
    {
        b.Linear("kv_proj", hidden, width);
        b.Linear("gate_proj", hidden, width);
        b.Param("position_bias", rate, width);
        b.RmsNorm("kv_norm", "DeepseekV4RMSNorm", normDim);
        beforeRotary?.Invoke();
        b.Leaf("rotary_emb", "DeepseekV4RotaryEmbedding");
    }

    /// <summary>The checkpoint layout: the conversion mapping's reference names, as save_pretrained writes them.</summary>
    private static void Checkpoint(TreeBuilder b, Shape s, long layers, List<string> layerTypes, List<bool> hashLayers, bool tie)
    {
        using (b.Scope("model", "DeepseekV4Model"))
        {
            b.Embedding("embed_tokens", s.Vocab, s.Hidden);
            b.ModuleList("layers", layers, i =>
            {
                using (b.Scope(i.ToString(CultureInfo.InvariantCulture), "DeepseekV4DecoderLayer", layer: i))
                {
                    var mix = (2 + s.HcMult) * s.HcMult;
                    foreach (var hc in new[] { "hc_attn", "hc_ffn" })
                    {
                        b.Param(hc + "_fn", mix, s.HcMult * s.Hidden);
                        b.Param(hc + "_base", mix);
                        b.Param(hc + "_scale", 3);
                    }
                    using (b.Scope("attn", "DeepseekV4Attention", ModuleLocation.Attention))
                    {
                        b.Param("attn_sink", s.Heads);
                        b.Linear("wq_a", s.Hidden, s.QLoraRank);
                        b.RmsNorm("q_norm", "DeepseekV4RMSNorm", s.QLoraRank);
                        b.Linear("wq_b", s.QLoraRank, s.Heads * s.HeadDim);
                        b.Linear("wkv", s.Hidden, s.HeadDim);
                        b.RmsNorm("norm", "DeepseekV4RMSNorm", s.HeadDim);
                        b.Linear("wo_a", s.Heads * s.HeadDim / s.OGroups, s.OGroups * s.OLoraRank, className: "DeepseekV4GroupedLinear");
                        b.Linear("wo_b", s.OGroups * s.OLoraRank, s.Hidden);
                        if (layerTypes[i] != "sliding_attention")
                        {
                            var csa = layerTypes[i] == "compressed_sparse_attention";
                            using (b.Scope("compressor", csa ? "DeepseekV4CSACompressor" : "DeepseekV4HCACompressor"))
                                CheckpointCompressor(b, s.Hidden, csa ? 2 * s.HeadDim : s.HeadDim, s.HeadDim, csa ? s.CsaRate : s.HcaRate);
                            if (csa)
                            {
                                using (b.Scope("indexer", "DeepseekV4Indexer"))
                                {
                                    using (b.Scope("compressor", "DeepseekV4CSACompressor"))
                                        CheckpointCompressor(b, s.Hidden, 2 * s.IndexHeadDim, s.IndexHeadDim, s.CsaRate);
                                    b.Linear("wq_b", s.QLoraRank, s.IndexHeads * s.IndexHeadDim);
                                    b.Linear("weights_proj", s.Hidden, s.IndexHeads);
                                }
                            }
                        }
                    }
                    using (b.Scope("ffn", "DeepseekV4SparseMoeBlock", ModuleLocation.Other))
                    {
                        using (b.Scope("gate", hashLayers[i] ? "DeepseekV4HashRouter" : "DeepseekV4TopKRouter", ModuleLocation.Router, kind: ModuleKind.Router))
                        {
                            b.Param("weight", s.Experts, s.Hidden);
                            if (hashLayers[i]) b.Buffer("tid2eid", s.Vocab, s.TopK);
                            else b.Buffer("bias", s.Experts);
                        }
                        Blocks.PerExpertMlps(b, "ModuleList", "DeepseekV4MLP", s.Experts, s.Hidden, s.MoeInter, s.ActClass, "w1", "w3", "w2");
                        using (b.Scope("shared_experts", "DeepseekV4MLP", ModuleLocation.SharedExpert))
                        {
                            b.Linear("w1", s.Hidden, s.MoeInter);
                            b.Linear("w3", s.Hidden, s.MoeInter);
                            b.Linear("w2", s.MoeInter, s.Hidden);
                        }
                    }
                    b.RmsNorm("attn_norm", "DeepseekV4RMSNorm", s.Hidden, ModuleLocation.Norm);
                    b.RmsNorm("ffn_norm", "DeepseekV4RMSNorm", s.Hidden, ModuleLocation.Norm);
                }
            });
            b.RmsNorm("norm", "DeepseekV4RMSNorm", s.Hidden, ModuleLocation.Norm);
            using (b.Scope("hc_head", "DeepseekV4HyperHead"))
            {
                b.Param("hc_fn", s.HcMult, s.HcMult * s.Hidden);
                b.Param("hc_base", s.HcMult);
                b.Param("hc_scale", 1);
            }
        }
        b.Linear("head", s.Hidden, s.Vocab, location: ModuleLocation.LmHead, tiedWeightTo: tie ? "model.embed_tokens.weight" : null);
    }

    private static void CheckpointCompressor(TreeBuilder b, long hidden, long width, long normDim, long rate)
    {
        b.Param("ape", rate, width);
        b.Linear("wkv", hidden, width);
        b.Linear("wgate", hidden, width);
        b.RmsNorm("norm", "DeepseekV4RMSNorm", normDim);
    }
}
