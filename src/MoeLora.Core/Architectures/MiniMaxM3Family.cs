using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// MiniMax-M3 (new in transformers 5): <c>minimax_m3_vl</c> builds MiniMaxM3SparseForConditionalGeneration (model:
/// vision_tower, multi_modal_projector, language_model; lm_head at the root), <c>minimax_m3_vl_text</c>
/// MiniMaxM3VLForCausalLM. Layout.V4 means the on-disk checkpoint layout: for the text type that is the v5 tree (no
/// conversion mapping); for the multimodal type it is the upstream layout transformers converts from
/// (<c>language_model.model.*</c>, <c>language_model.lm_head</c>, <c>vision_tower.vision_model.*</c> with
/// <c>encoder.layers</c> and <c>patch_embedding</c>, the projector's merge MLP as <c>patch_merge_mlp</c>,
/// <c>mlp</c> → <c>block_sparse_moe</c> everywhere, per-expert <c>w1/w2/w3</c>, gate_up_proj split into
/// gate_proj/up_proj, the indexer's modules as <c>self_attn.index_*</c>); containers that exist only on disk are
/// plain Modules. The runtime runs the multimodal class on text, its tower and projector built but never run.
/// <para>
/// Text layers: attention with per-head Gemma-style q/k norms, plus a lightning indexer (q_proj, k_proj, q/k norms)
/// on <c>minimax_m3_sparse</c> layers of <c>layer_types</c>; <c>mlp_layer_types</c> picks the MoE block (TopK
/// router with a persistent <c>e_score_correction_bias</c> buffer, experts of <c>intermediate_size</c> with a
/// clamped SwiGLU and no activation module, a shared MLP of <c>shared_intermediate_size</c>) or a dense MLP of
/// <c>dense_intermediate_size</c>; both MLPs use a fused gate_up_proj nn.Linear. Upstream configs'
/// <c>sparse_attention_config</c> and <c>moe_layer_freq</c> are read as transformers does.
/// </para>
/// </summary>
internal sealed class MiniMaxM3Family : IArchitecture
{
    private const string P = "MiniMaxM3VL";

    public IReadOnlyList<string> ModelTypes => ["minimax_m3_vl", "minimax_m3_vl_text"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var multimodal = c.ModelType == "minimax_m3_vl";
        var text = multimodal ? Blocks.SubOrDefaults(c, "text_config") : c;
        var disk = multimodal && layout == Layout.V4;
        var t = TextDims.Read(text);

        var sparseCfg = text.Sub("sparse_attention_config");
        var layerTypes = text.StringList("layer_types")
            ?? sparseCfg?.TruthyList("sparse_attention_freq")?.Select(f => f ? "minimax_m3_sparse" : "full_attention").ToList();
        var moeFreq = text.TruthyList("moe_layer_freq");
        var (moeLayers, denseLayers) = Blocks.SplitByMlpLayerTypes(text, t.Layers, i => moeFreq is null || (i < moeFreq.Count && moeFreq[i]));
        if (layerTypes is not null && layerTypes.Count < t.Layers)
            throw new ConfigException($"config field 'layer_types' has {layerTypes.Count} entries but num_hidden_layers is {t.Layers}");
        var moeSet = moeLayers.ToHashSet();
        // Upstream sparse_attention_config keys override the flat index_* fields.
        var indexHeads = sparseCfg?.IntOrNull("sparse_num_index_heads", null) ?? text.Positive("index_n_heads", 4);
        var indexDim = sparseCfg?.IntOrNull("sparse_index_dim", null) ?? text.Positive("index_head_dim", 128);

        var tie = multimodal ? c.Bool("tie_word_embeddings", false) || t.Tie : t.Tie;
        var b = new TreeBuilder(multimodal ? "MiniMaxM3SparseForConditionalGeneration" : "MiniMaxM3VLForCausalLM", layout);

        void Layer(int i)
        {
            var sparseAttention = layerTypes is not null && layerTypes[i] == "minimax_m3_sparse";
            Blocks.Attention(b, P + "Attention", t.Hidden, t.Heads, t.Kv, t.HeadDim, false, false, afterProjections: bb =>
            {
                bb.RmsNorm("q_norm", P + "RMSNorm", t.HeadDim);
                bb.RmsNorm("k_norm", P + "RMSNorm", t.HeadDim);
                if (sparseAttention) Indexer(bb, disk, t.Hidden, indexHeads, indexDim);
            });
            var mlpName = disk ? "block_sparse_moe" : "mlp";
            if (moeSet.Contains(i))
            {
                using (b.Scope(mlpName, P + "SparseMoeBlock", ModuleLocation.Other))
                {
                    Blocks.TopKRouter(b, "gate", P + "TopKRouter", t.Experts, t.Hidden, correctionBias: !disk);
                    if (disk)
                    {
                        Blocks.Experts(b, Layout.V4, P, t.Experts, t.Hidden, t.Inter, "SiLUActivation", Blocks.ExpertNames.Mixtral);
                    }
                    else
                    {
                        // Its SwiGLU is computed inline (swiglu_alpha, swiglu_limit): no act_fn module.
                        using (b.Scope("experts", P + "Experts", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts, numExperts: t.Experts))
                        {
                            b.Param("gate_up_proj", t.Experts, 2 * t.Inter, t.Hidden);
                            b.Param("down_proj", t.Experts, t.Hidden, t.Inter);
                        }
                    }
                    DenseMlp(b, "shared_experts", disk, t.Hidden, t.SharedInter, ModuleLocation.SharedExpert);
                }
            }
            else
            {
                DenseMlp(b, mlpName, disk, t.Hidden, t.DenseInter, ModuleLocation.Mlp);
            }
            b.RmsNorm("input_layernorm", P + "RMSNorm", t.Hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", P + "RMSNorm", t.Hidden, ModuleLocation.Norm);
        }

        var prefix = "";
        if (!multimodal)
        {
            Blocks.CausalLm(b, P, t.Vocab, t.Hidden, t.Layers, tie, Layer, modelClass: P + "TextModel");
        }
        else if (!disk)
        {
            using (b.Scope("model", P + "Model"))
            {
                VisionModule(b, c, t.Hidden, disk: false);
                using (b.Scope("language_model", P + "TextModel"))
                    Blocks.DecoderStack(b, P, t.Vocab, t.Hidden, t.Layers, Layer);
            }
            b.Linear("lm_head", t.Hidden, t.Vocab, location: ModuleLocation.LmHead,
                tiedWeightTo: tie ? "model.language_model.embed_tokens.weight" : null);
            prefix = "model.language_model.";
        }
        else
        {
            VisionModule(b, c, t.Hidden, disk: true);
            using (b.Scope("language_model", P + "ForCausalLM"))
                Blocks.CausalLm(b, P, t.Vocab, t.Hidden, t.Layers, tie, Layer, modelClass: P + "TextModel");
            prefix = "language_model.model.";
        }

        var routing = $"sigmoid of {t.Experts} router logits; top-{t.TopK} chosen on sigmoid + e_score_correction_bias, their " +
            $"sigmoids renormalised, scaled by {text.Double("routed_scaling_factor", 2.0)}, plus a shared expert";
        var moe = new MoeFacts(t.Experts, t.TopK, 1, t.Inter, t.SharedInter, moeLayers, denseLayers, routing);
        var spec = Blocks.Spec(c, c.ModelType!, b.Build(), moe, t.Hidden, t.Layers, t.Vocab, t.Heads, t.Kv, tie, "silu");
        var sparseLayers = Enumerable.Range(0, (int)t.Layers).Where(i => layerTypes?[i] == "minimax_m3_sparse").ToHashSet();
        var (indexer, refusal) = sparseLayers.Count == 0 ? (null, null) : IndexerRuntime(text, sparseCfg, t, indexHeads, indexDim);
        var runtime = refusal is null ? TextRuntime(text, t, moeSet, sparseLayers, indexer) : null;
        if (!multimodal)
            return spec with { Runtime = runtime, RuntimeUnavailable = refusal };
        // The multimodal class runs text only (no pixel_values: transformers never calls the vision tower): its tower and
        // projector (and the on-disk patch_merge_mlp) are built inert, the text decoder at its path.
        var towers = disk ? InertTowers.Before(["vision_tower", "multi_modal_projector", "patch_merge_mlp"], "language_model.model", "language_model.lm_head")
            : InertTowers.Before(["model.vision_tower", "model.multi_modal_projector"], "model.language_model", "lm_head");
        return spec with
        {
            RuntimeUnavailable = refusal,
            Runtime = runtime is null ? null : runtime with { TieWordEmbeddings = tie, Towers = towers },
            TextConfig = text,
            DecoderLayersPath = prefix + "layers",
            InputEmbeddings = prefix + "embed_tokens",
            OutputEmbeddings = disk ? "language_model.lm_head" : "lm_head",
        };
    }

    /// <summary>
    /// The text decoder: pre-norm, per-head q/k norms, rope on partial_rotary_factor of the head (rotary_dim is not
    /// read by transformers' rotary embedding), a sigmoid router whose selection adds the router's
    /// e_score_correction_bias buffer, renormalised weights, routed output × routed_scaling_factor plus the shared
    /// expert; experts, shared expert and dense MLPs use the clamped SwiGLU (swiglu_alpha, swiglu_limit), never hidden_act.
    /// Layers in <paramref name="sparseLayers"/> add the lightning indexer's block selection to their attention.
    /// </summary>
    private static DecoderRuntime TextRuntime(ModelConfig text, TextDims t, HashSet<int> moeSet, HashSet<int> sparseLayers,
        BlockIndexerSettings? indexer)
    {
        // MiniMaxM3VLRMSNorm: x·rsqrt(mean x² + eps) · (1 + weight), in fp32.
        var norm = new NormSettings(NormKind.RmsOnePlusWeight, text.Double("rms_norm_eps", 1e-6));
        var rotary = (long)(t.HeadDim * RopeSettings.PartialRotaryFactor(text, 1.0));
        double limit = text.Double("swiglu_limit", 7.0), alpha = text.Double("swiglu_alpha", 1.702);
        var moeFf = new MoeSettings(
            new SigmoidBiasRouterSettings("gate", t.Experts, t.TopK, new ScoreBias("e_score_correction_bias", ScoreBiasOwner.Router, IsParameter: false),
                NormTopK: true, NormEps: 0, Scale: 1.0, SoftCap: 0),
            new ExpertsSettings(ExpertsLayout.GateUpOutInClamped, t.Experts, t.Inter, "silu", limit, alpha),
            new SharedExpertSettings("shared_experts", t.SharedInter, "silu", null, FusedGateUp: true), MoeOrder.RouterFirst,
            new MoeOptions(RoutedScale: text.Double("routed_scaling_factor", 2.0)));
        var dense = new FusedGateUpMlpSettings(t.DenseInter, "silu", "gate_up_proj", "down_proj", null, limit, alpha);
        var layers = Enumerable.Range(0, (int)t.Layers).Select(i => new DecoderLayerRuntime(
            new StandardAttentionSettings(t.Heads, t.Kv, t.HeadDim, false, false, QkNormKind.PerHead, norm.Eps, Sinks: false, MaskSettings.Full, rotary,
                new StandardAttentionOptions(QkNormType: NormKind.RmsOnePlusWeight, BlockIndexer: sparseLayers.Contains(i) ? indexer : null)),
            "mlp", moeSet.Contains(i) ? moeFf : dense, norm, norm)).ToList();
        return new DecoderRuntime(t.Vocab, t.Hidden, t.Tie, text.Double("initializer_range", 0.02), norm,
            RopeSettings.Read(text, 5000000.0, rotary), layers);
    }

    /// <summary>
    /// The sparse layers' lightning indexer (index_* fields, or sparse_attention_config's sparse_block_size,
    /// sparse_topk_blocks, sparse_local_block as transformers reads them), or why it cannot run: MiniMaxM3VLIndexer's
    /// block mask gives each indexer head's selection to heads / index_n_heads consecutive query heads, so the indexer
    /// heads must divide the attention heads.
    /// </summary>
    private static (BlockIndexerSettings?, string?) IndexerRuntime(ModelConfig text, ModelConfig? sparseCfg, TextDims t, long heads, long dim)
    {
        var blockSize = sparseCfg?.IntOrNull("sparse_block_size", null) ?? text.Int("index_block_size", 128);
        var topK = sparseCfg?.IntOrNull("sparse_topk_blocks", null) ?? text.Int("index_topk_blocks", 16);
        var local = sparseCfg?.IntOrNull("sparse_local_block", null) ?? text.Int("index_local_blocks", 1);
        if (blockSize <= 0 || topK <= 0 || local < 0)
            return (null, $"MiniMax-M3's sparse attention layers with index_block_size {blockSize}, index_topk_blocks {topK}, index_local_blocks {local}");
        if (t.Heads % heads != 0)
            return (null, $"MiniMax-M3's sparse attention layers with {heads} indexer heads for {t.Heads} attention heads (they must divide them)");
        var norm = new NormSettings(NormKind.RmsOnePlusWeight, text.Double("rms_norm_eps", 1e-6));
        return (new BlockIndexerSettings(heads, dim, blockSize, topK, local, norm), null);
    }

    /// <summary>The text config's sizes (MiniMaxM3VLTextConfig defaults; num_experts is an alias).</summary>
    private sealed record TextDims(long Vocab, long Hidden, long Inter, long DenseInter, long SharedInter, long Layers,
        long Heads, long Kv, long HeadDim, long Experts, long TopK, bool Tie)
    {
        public static TextDims Read(ModelConfig t) => new(
            t.Positive("vocab_size", 200064), t.Positive("hidden_size", 6144), t.Positive("intermediate_size", 3072),
            t.Positive("dense_intermediate_size", 12288), t.Positive("shared_intermediate_size", 3072),
            t.Positive("num_hidden_layers", 60), t.Positive("num_attention_heads", 64), t.Positive("num_key_value_heads", 4),
            t.Positive("head_dim", 128), t.FirstInt("num_local_experts", "num_experts") ?? 128,
            t.Positive("num_experts_per_tok", 4), t.Bool("tie_word_embeddings", false));
    }

    /// <summary>MiniMaxM3VLIndexer (v5) or its upstream self_attn.index_* modules.</summary>
    private static void Indexer(TreeBuilder b, bool disk, long hidden, long heads, long dim)
    {
        if (disk)
        {
            b.Linear("index_q_proj", hidden, heads * dim);
            b.Linear("index_k_proj", hidden, dim);
            b.RmsNorm("index_q_norm", P + "RMSNorm", dim);
            b.RmsNorm("index_k_norm", P + "RMSNorm", dim);
            return;
        }
        using (b.Scope("indexer", P + "Indexer"))
        {
            b.Linear("q_proj", hidden, heads * dim);
            b.Linear("k_proj", hidden, dim);
            b.RmsNorm("q_norm", P + "RMSNorm", dim);
            b.RmsNorm("k_norm", P + "RMSNorm", dim);
        }
    }

    /// <summary>MiniMaxM3VLDenseMLP: one gate_up_proj nn.Linear (split into gate_proj/up_proj on disk), down_proj.</summary>
    private static void DenseMlp(TreeBuilder b, string name, bool disk, long hidden, long inter, ModuleLocation location)
    {
        using (b.Scope(name, P + "DenseMLP", location))
        {
            if (disk)
            {
                b.Linear("gate_proj", hidden, inter);
                b.Linear("up_proj", hidden, inter);
            }
            else
            {
                b.Linear("gate_up_proj", hidden, 2 * inter);
            }
            b.Linear("down_proj", inter, hidden);
        }
    }

    /// <summary>The vision tower and the projector (v5 names under model., or the upstream names at the root).</summary>
    private static void VisionModule(TreeBuilder b, ModelConfig c, long textHidden, bool disk)
    {
        var v = Blocks.SubOrDefaults(c, "vision_config");
        // Defaults: MiniMaxM3VLVisionConfig / MiniMaxM3VLConfig.
        var hv = v.Positive("hidden_size", 1280);
        var iv = v.Positive("intermediate_size", 5120);
        var layers = v.Positive("num_hidden_layers", 32);
        var channels = v.Positive("num_channels", 3);
        var patch = v.Positive("patch_size", 14);
        var temporal = v.Positive("temporal_patch_size", 2);
        var merge = v.Positive("spatial_merge_size", 2);
        var actClass = Blocks.ActivationClass(v.String("hidden_act", "gelu")!, Layout.V5);
        var projHidden = c.Positive("projector_hidden_size", 6144);
        // __post_init__ sets merged_hidden_size = text hidden · spatial_merge_size², then the base class applies the
        // config's own merged_hidden_size (a saved config.json carries one) over it.
        var merged = c.IntOrNull("merged_hidden_size", null) ?? textHidden * merge * merge;

        using (b.Scope("vision_tower", disk ? "Module" : P + "VisionModel", ModuleLocation.Vision))
        using (disk ? b.Scope("vision_model", P + "VisionModel") : null)
        {
            using (b.Scope("embeddings", P + "VisionEmbeddings"))
            using (b.Scope(disk ? "patch_embedding" : "proj", "Conv3d", kind: ModuleKind.Other))
                b.Param("weight", hv, channels, temporal, patch, patch);
            b.LayerNorm("pre_layrnorm", hv);
            using (disk ? b.Scope("encoder", "Module") : null)
            {
                b.ModuleList("layers", layers, j =>
                {
                    using (b.Scope(j.ToString(System.Globalization.CultureInfo.InvariantCulture), P + "VisionEncoderLayer"))
                    {
                        Blocks.VisionSelfAttention(b, "self_attn", P + "VisionAttention", hv);
                        b.LayerNorm("layer_norm1", hv);
                        using (b.Scope(disk ? "block_sparse_moe" : "mlp", P + "VisionMLP"))
                        {
                            b.Leaf("activation_fn", actClass);
                            b.Linear("fc1", hv, iv, true);
                            b.Linear("fc2", iv, hv, true);
                        }
                        b.LayerNorm("layer_norm2", hv);
                    }
                });
            }
            if (!disk) b.Leaf("rotary_emb", P + "VisionRotaryEmbedding");
        }
        using (b.Scope("multi_modal_projector", P + "MultiModalProjector", ModuleLocation.Projector))
        {
            b.Linear("linear_1", hv, projHidden, true);
            if (!disk) b.Leaf("act", "GELUActivation");
            b.Linear("linear_2", projHidden, textHidden, true);
            if (!disk)
            {
                b.Linear("merge_linear_1", merged, projHidden, true);
                b.Leaf("merge_act", "GELUActivation");
                b.Linear("merge_linear_2", projHidden, textHidden, true);
            }
        }
        if (disk)
        {
            using (b.Scope("patch_merge_mlp", "Module", ModuleLocation.Projector))
            {
                b.Linear("linear_1", merged, projHidden, true);
                b.Linear("linear_2", projHidden, textHidden, true);
            }
        }
    }
}
