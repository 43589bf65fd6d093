using System.Globalization;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Inkling: <c>inkling_text</c> builds <c>InklingForCausalLM</c>, <c>inkling_mm_model</c>
/// <c>InklingForConditionalGeneration</c> (model.language_model, model.audio_tower, model.vision_tower, lm_head).
/// <para>
/// Text model: no rotary embedding; attention adds an r_proj (heads·d_rel) with a learned relative-position bias bank
/// (rel_logits_proj.proj [d_rel, extent]), depthwise short convolutions on k and v, q/k norms. <c>layer_types</c>
/// picks per layer the sliding-window geometry (hybrid_sliding: swa_* heads and head_dim, extent =
/// sliding_window_size) or the global one (hybrid: extent = rel_extent); by default every sixth layer is global.
/// <c>mlp_layer_types</c> picks an MoE (sparse) or a dense MLP with a global scale. The MoE router scores n_routed +
/// n_shared experts (sigmoid, its persistent e_score_correction_bias buffer for the choice); routed experts are fused
/// (gate_up_proj / down_proj) and the n_shared experts are 3-D parameters too (gate_proj, up_proj [S, I, H], down_proj
/// [S, H, I]), so no module-name target reaches any expert. Each layer also has short convolutions before attention
/// and MLP. The LM head is never tied.
/// </para>
/// <para>
/// Runtime: inkling_text runs (transformers 5.17 parity on a left-padded batch), attention through the SDPA/eager
/// switch with the relative-position bias added to the mask, the short convolutions in fp32 with fp32 weights (as
/// transformers' _keep_in_fp32_modules_strict), log scaling on global layers when log_scaling_n_floor is set.
/// inkling_mm_model runs on text too, its audio and vision towers built but never run: transformers 5.17's InklingModel
/// applies the text model's embed_norm to the embeddings it hands the text model, which applies it again (its fixture's
/// first hidden state is the embedding normed twice), and its checkpoints' w13 tensors hold gate and up rows
/// interleaved (<see cref="ModelSpec.CheckpointGateUpInterleaved"/>). Refused: a head sliced to unpadded_vocab_size.
/// </para>
/// <para>
/// Multimodal: the audio tower is one embedding of n_mel_bins · mel_vocab_size rows plus a norm; the vision tower is an
/// hMLP of <c>n_layers</c> projections whose widths follow <see cref="VisionScales"/> (every projection but the last,
/// which maps to the text width, is followed by an RMSNorm), then a final norm.
/// </para>
/// <para>
/// Not in transformers 4.57: <see cref="Layout.V4"/> means the checkpoint layout. inkling_text has none of its own
/// (the v5 names); inkling_mm_model's checkpoints use the upstream names transformers converts from:
/// model.llm (embed, embed_norm, norm, unembed for lm_head), attn.wq_du/wk_dv/wv_dv/wr_du/wo_ud, short convolutions
/// without their conv1d module, attn_norm/mlp_norm, experts.w13_weight/w2_weight, shared_w13_weight/shared_w2_weight,
/// the dense MLP's w13_dn/w2_md, the router's bias (its e_score_correction_bias), model.audio (encoder, final_norm)
/// and model.visual (layers.linear_N, layers.norm_N, final_norm). Containers that exist only on disk are plain Modules.
/// </para>
/// </summary>
internal sealed class InklingFamily : IArchitecture
{
    private const string P = "Inkling";

    public IReadOnlyList<string> ModelTypes => ["inkling_text", "inkling_mm_model"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var multimodal = c.ModelType == "inkling_mm_model";
        var textConfig = multimodal ? Blocks.SubOrDefaults(c, "text_config") : c;
        var t = Text.Read(textConfig, layout);
        // Only the multimodal checkpoints rename keys; inkling_text's on-disk names are its v5 names.
        var disk = multimodal && layout == Layout.V4;

        var b = new TreeBuilder(multimodal ? P + "ForConditionalGeneration" : P + "ForCausalLM", layout);
        string textModel;
        if (!multimodal)
        {
            TextModel(b, "model", t, disk: false);
            b.Linear("lm_head", t.Hidden, t.Vocab, location: ModuleLocation.LmHead);
            textModel = "model";
        }
        else
        {
            // On disk the head is model.llm.unembed, inside the text model.
            using (b.Scope("model", disk ? "Module" : P + "Model"))
            {
                TextModel(b, disk ? "llm" : "language_model", t, disk, lmHead: disk);
                AudioTower(b, Blocks.SubOrDefaults(c, "audio_config"), t.Hidden, disk);
                VisionTower(b, Blocks.SubOrDefaults(c, "vision_config"), t.Hidden, disk);
            }
            if (!disk) b.Linear("lm_head", t.Hidden, t.Vocab, location: ModuleLocation.LmHead);
            textModel = disk ? "model.llm" : "model.language_model";
        }

        var (moeLayers, denseLayers) = Blocks.SplitLayers(t.Layers, i => t.MlpTypes[i] == "sparse");
        var routing = $"sigmoid over {t.Experts} routed + {t.Shared} shared experts (+ e_score_correction_bias for the choice), " +
            $"top-{t.TopK} routed; the chosen and shared experts' log-sigmoids are softmax-normalised together and scaled by route_scale";
        var moe = new MoeFacts(t.Experts, t.TopK, t.Shared, t.MoeInter, t.MoeInter, moeLayers, denseLayers, routing);
        var spec = Blocks.NestedSpec(c, textConfig, c.ModelType!, b.Build(), moe, t.Hidden, t.Layers, t.Vocab, t.Global.Heads,
            t.Global.KvHeads, tie: false, t.Act, textModel, lmHead: disk ? "model.llm.unembed" : "lm_head",
            embedName: disk ? "embed" : "embed_tokens") with { CheckpointGateUpInterleaved = multimodal };
        // The head of a checkpoint whose vocabulary is padded is sliced to unpadded_vocab_size; the runtime keeps every row.
        if (textConfig.IntOrNull("unpadded_vocab_size", null) is { } unpadded && unpadded < t.Vocab)
            return spec with { RuntimeUnavailable = "Inkling's logits sliced to unpadded_vocab_size" };
        if (!multimodal) return spec with { Runtime = Runtime(c, t) };
        // The runtime builds the transformers-5 modules; on disk the head sits inside the text model (model.llm.unembed).
        if (disk) return spec with { RuntimeUnavailable = "inkling_mm_model's checkpoint layout (the runtime builds the transformers-5 modules)" };
        // Text only (no audio or pixel inputs, so transformers never calls the towers): the audio and vision towers are
        // built inert between the text model and the head, as registered. InklingModel.forward norms the embeddings with
        // language_model.embed_norm and hands them to the text model as inputs_embeds, which norms them again.
        return spec with
        {
            Runtime = Runtime(textConfig, t) with
            {
                Towers = new InertTowers(["model.language_model", "model.audio_tower", "model.vision_tower", "lm_head"], "model.language_model", "lm_head"),
                EmbeddingNormPasses = 2,
            },
        };
    }

    /// <summary>
    /// InklingForCausalLM: embed_norm on the embeddings, per layer the sliding or global attention geometry (no rotary
    /// embedding) and a sparse or dense MLP, each sublayer's output through its residual short convolution, and logits
    /// of the final hidden states divided by logits_mup_width_multiplier.
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig c, Text t)
    {
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6));
        var window = c.FirstInt("sliding_window_size", "sliding_window") ?? 512;
        var logScaling = c.IntOrNull("log_scaling_n_floor", null) is { } floor
            ? new InklingLogScaling(floor, c.Double("log_scaling_alpha", 0.1)) : null;
        var sparse = new InklingMoeSettings(t.Experts, t.Shared, t.TopK, t.MoeInter, t.Act, c.Double("route_scale", 8.0));
        var dense = new GatedMlpSettings(t.Inter, t.Act, GlobalScale: "global_scale");
        var convs = new SublayerConvs(t.Kernel);
        var layers = Enumerable.Range(0, (int)t.Layers).Select(i =>
        {
            var sliding = t.LayerTypes[i] == "hybrid_sliding";
            var g = sliding ? t.Local : t.Global;
            var attention = new InklingAttentionSettings(g.Heads, g.KvHeads, g.HeadDim, t.DRel, g.RelExtent, t.Kernel, norm.Eps,
                sliding ? new MaskSettings(MaskKind.Sliding, window) : MaskSettings.Full, sliding ? null : logScaling);
            return new DecoderLayerRuntime(attention, "mlp", t.MlpTypes[i] == "sparse" ? sparse : dense, norm, norm, Convs: convs);
        }).ToList();
        return new DecoderRuntime(t.Vocab, t.Hidden, TieWordEmbeddings: false, c.Double("initializer_range", 0.02), norm,
            new RopeSettings("default", 10000.0, t.Global.HeadDim), layers,
            Scaling: new ModelScaling(LogitsMultiplier: 1.0 / c.Double("logits_mup_width_multiplier", 24.0)),
            Names: new ModelNames("embed_tokens", "norm", Rotary: null), EmbeddingNorm: new NamedNorm("embed_norm", norm));
    }

    private sealed record Geometry(long Heads, long KvHeads, long HeadDim, long RelExtent);

    /// <summary>InklingTextConfig's fields and defaults, read once.</summary>
    private sealed record Text(long Vocab, long Hidden, long Layers, Geometry Global, Geometry Local, long DRel, long Kernel,
        long Inter, long MoeInter, long Experts, long Shared, long TopK, string Act, string ActClass,
        IReadOnlyList<string> LayerTypes, IReadOnlyList<string> MlpTypes)
    {
        public static Text Read(ModelConfig c, Layout layout)
        {
            var layers = c.Positive("num_hidden_layers", 66);
            var window = c.FirstInt("sliding_window_size", "sliding_window") ?? 512;
            var types = c.StringList("layer_types") ?? Enumerable.Range(0, (int)layers)
                .Select(i => (c.IntList("local_layer_ids") is { } ids ? ids.Contains(i) : (i + 1) % 6 != 0) ? "hybrid_sliding" : "hybrid").ToList();
            var denseIdx = c.Int("dense_mlp_idx", 0);
            var mlpTypes = c.StringList("mlp_layer_types")
                ?? Enumerable.Range(0, (int)layers).Select(i => i < denseIdx ? "dense" : "sparse").ToList();
            if (types.Count < layers || mlpTypes.Count < layers)
                throw new ConfigException($"config fields 'layer_types' and 'mlp_layer_types' need {layers} entries");
            Blocks.CheckLayerTypes(types, "layer_types", "hybrid", "hybrid_sliding");
            Blocks.CheckLayerTypes(mlpTypes, "mlp_layer_types", "sparse", "dense");
            var act = c.String("hidden_act", "silu")!;
            return new(
                c.Positive("vocab_size", 201024), c.Positive("hidden_size", 6144), layers,
                new Geometry(c.Positive("num_attention_heads", 64), c.Positive("num_key_value_heads", 8), c.Positive("head_dim", 128),
                    c.Positive("rel_extent", 1024)),
                new Geometry(c.Positive("swa_num_attention_heads", 64), c.Positive("swa_num_key_value_heads", 16),
                    c.Positive("swa_head_dim", 128), window),
                c.Positive("d_rel", 16), c.FirstInt("conv_kernel_size", "sconv_kernel_size") ?? 4,
                c.FirstInt("dense_intermediate_size", "intermediate_size") ?? 24576, c.Positive("moe_intermediate_size", 3072),
                c.FirstInt("n_routed_experts", "num_local_experts") ?? 256, c.Positive("n_shared_experts", 2),
                c.Positive("num_experts_per_tok", 6), act, Blocks.ActivationClass(act, layout), types, mlpTypes);
        }
    }

    /// <summary>
    /// InklingTextModel under <paramref name="name"/> (embed_tokens, layers, norm, embed_norm), or on disk the llm
    /// module (embed, layers, norm, embed_norm, and <paramref name="lmHead"/>: the unembed head).
    /// </summary>
    private static void TextModel(TreeBuilder b, string name, Text t, bool disk, bool lmHead = false)
    {
        using (b.Scope(name, disk ? "Module" : P + "TextModel"))
        {
            b.Embedding(disk ? "embed" : "embed_tokens", t.Vocab, t.Hidden);
            b.ModuleList("layers", t.Layers, i =>
            {
                using (b.Scope(i.ToString(CultureInfo.InvariantCulture), P + "DecoderLayer", ModuleLocation.Other, layer: i))
                    DecoderLayer(b, t, i, disk);
            });
            b.RmsNorm("norm", P + "RMSNorm", t.Hidden, ModuleLocation.Norm);
            b.RmsNorm("embed_norm", P + "RMSNorm", t.Hidden, ModuleLocation.Norm);
            if (lmHead) b.Linear("unembed", t.Hidden, t.Vocab, location: ModuleLocation.LmHead);
        }
    }

    private static void DecoderLayer(TreeBuilder b, Text t, int i, bool disk)
    {
        Attention(b, t.Hidden, t.LayerTypes[i] == "hybrid_sliding" ? t.Local : t.Global, t.DRel, t.Kernel, disk);
        if (t.MlpTypes[i] == "sparse") Moe(b, t, disk);
        else
        {
            using (b.Scope("mlp", P + "MLP", ModuleLocation.Mlp))
            {
                b.Param("global_scale", 1);
                if (disk)
                {
                    // gate_proj and up_proj stored as one [2I, H] matrix.
                    b.Linear("w13_dn", t.Hidden, 2 * t.Inter);
                    b.Linear("w2_md", t.Inter, t.Hidden);
                }
                else
                {
                    b.Linear("gate_proj", t.Hidden, t.Inter);
                    b.Linear("up_proj", t.Hidden, t.Inter);
                    b.Linear("down_proj", t.Inter, t.Hidden);
                    b.Leaf("act_fn", t.ActClass);
                }
            }
        }
        b.RmsNorm(disk ? "attn_norm" : "input_layernorm", P + "RMSNorm", t.Hidden, ModuleLocation.Norm);
        b.RmsNorm(disk ? "mlp_norm" : "post_attention_layernorm", P + "RMSNorm", t.Hidden, ModuleLocation.Norm);
        ShortConv(b, "attn_sconv", t.Hidden, t.Kernel, disk);
        ShortConv(b, "mlp_sconv", t.Hidden, t.Kernel, disk);
    }

    private static void Attention(TreeBuilder b, long hidden, Geometry g, long dRel, long kernel, bool disk)
    {
        using (b.Scope(disk ? "attn" : "self_attn", P + "Attention", ModuleLocation.Attention))
        {
            b.Linear(disk ? "wq_du" : "q_proj", hidden, g.Heads * g.HeadDim);
            b.Linear(disk ? "wk_dv" : "k_proj", hidden, g.KvHeads * g.HeadDim);
            b.Linear(disk ? "wv_dv" : "v_proj", hidden, g.KvHeads * g.HeadDim);
            b.Linear(disk ? "wr_du" : "r_proj", hidden, g.Heads * dRel);
            b.Linear(disk ? "wo_ud" : "o_proj", g.Heads * g.HeadDim, hidden);
            ShortConv(b, "k_sconv", g.KvHeads * g.HeadDim, kernel, disk);
            ShortConv(b, "v_sconv", g.KvHeads * g.HeadDim, kernel, disk);
            b.RmsNorm("q_norm", P + "RMSNorm", g.HeadDim);
            b.RmsNorm("k_norm", P + "RMSNorm", g.HeadDim);
            using (b.Scope("rel_logits_proj", P + "RelativeLogits", kind: ModuleKind.Other))
                b.Param("proj", dRel, g.RelExtent);
        }
    }

    private static void Moe(TreeBuilder b, Text t, bool disk)
    {
        using (b.Scope("mlp", P + "MoE", ModuleLocation.Other))
        {
            using (b.Scope("gate", P + "TopkRouter", ModuleLocation.Router, kind: ModuleKind.Router))
            {
                b.Param("weight", t.Experts + t.Shared, t.Hidden);
                b.Param("global_scale", 1);
                b.Buffer(disk ? "bias" : "e_score_correction_bias", t.Experts);
            }
            using (b.Scope("experts", P + "Experts", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts, numExperts: t.Experts))
            {
                b.Param(disk ? "w13_weight" : "gate_up_proj", t.Experts, 2 * t.MoeInter, t.Hidden);
                b.Param(disk ? "w2_weight" : "down_proj", t.Experts, t.Hidden, t.MoeInter);
                if (!disk) b.Leaf("act_fn", t.ActClass);
            }
            using (b.Scope("shared_experts", P + "SharedExperts", ModuleLocation.SharedExpert, kind: ModuleKind.Experts, numExperts: t.Shared))
            {
                if (disk)
                {
                    b.Param("shared_w13_weight", t.Shared, 2 * t.MoeInter, t.Hidden);
                    b.Param("shared_w2_weight", t.Shared, t.Hidden, t.MoeInter);
                }
                else
                {
                    b.Param("gate_proj", t.Shared, t.MoeInter, t.Hidden);
                    b.Param("up_proj", t.Shared, t.MoeInter, t.Hidden);
                    b.Param("down_proj", t.Shared, t.Hidden, t.MoeInter);
                    b.Leaf("act_fn", t.ActClass);
                }
            }
        }
    }

    /// <summary>InklingShortConvolution: a depthwise Conv1d without bias (on disk the weight sits on the module itself).</summary>
    private static void ShortConv(TreeBuilder b, string name, long channels, long kernel, bool disk)
    {
        using (b.Scope(name, disk ? "Module" : P + "ShortConvolution", kind: disk ? ModuleKind.Other : ModuleKind.Container))
        {
            if (disk)
            {
                b.Param("weight", channels, 1, kernel);
                return;
            }
            using (b.Scope("conv1d", "Conv1d", kind: ModuleKind.Other))
                b.Param("weight", channels, 1, kernel);
        }
    }

    /// <summary>InklingAudioModel: one embedding over every (mel bin, code) pair, then a norm (audio → model.audio on disk).</summary>
    private static void AudioTower(TreeBuilder b, ModelConfig a, long textHidden, bool disk)
    {
        // Defaults: InklingAudioConfig (num_codebooks / codebook_size are aliases); its width is the text width.
        var rows = (a.FirstInt("n_mel_bins", "num_codebooks") ?? 80) * (a.FirstInt("mel_vocab_size", "codebook_size") ?? 256);
        // The report groups every non-text encoder (audio too) under vision, as for Qwen3-Omni.
        using (b.Scope(disk ? "audio" : "audio_tower", disk ? "Module" : P + "AudioModel", ModuleLocation.Vision))
        {
            if (disk)
            {
                b.Embedding("encoder", rows, textHidden, ModuleLocation.Vision);
                b.RmsNorm("final_norm", P + "RMSNorm", textHidden);
                return;
            }
            using (b.Scope("embed_audio_tokens", P + "AudioModelEmbeddings"))
                b.Embedding("embed_audio_tokens", rows, textHidden, ModuleLocation.Vision);
            b.RmsNorm("norm", P + "RMSNorm", textHidden);
        }
    }

    /// <summary>InklingVisionModel: the hMLP projections (layers.linear_N / layers.norm_N on disk), then final_norm.</summary>
    private static void VisionTower(TreeBuilder b, ModelConfig v, long textHidden, bool disk)
    {
        // Defaults: InklingVisionConfig (num_hidden_layers is stored as n_layers); its text_hidden_size is the text width.
        var layers = v.FirstInt("n_layers", "num_hidden_layers") ?? 24;
        var scales = VisionScales.Plan(v.Positive("temporal_patch_size", 2), v.Positive("patch_size", 40), layers,
            v.Positive("num_channels", 3));
        using (b.Scope(disk ? "visual" : "vision_tower", disk ? "Module" : P + "VisionModel", ModuleLocation.Vision))
        {
            if (disk)
            {
                using (b.Scope("layers", "Module"))
                {
                    for (var i = 0; i < layers; i++)
                    {
                        var (input, output) = VisionScales.Projection(scales, i, layers, textHidden);
                        var n = i.ToString(CultureInfo.InvariantCulture);
                        b.Linear("linear_" + n, input, output);
                        if (i != layers - 1) b.RmsNorm("norm_" + n, P + "RMSNorm", output);
                    }
                }
            }
            else
            {
                b.ModuleList("encoder_layers", layers, i =>
                {
                    var (input, output) = VisionScales.Projection(scales, i, layers, textHidden);
                    using (b.Scope(i.ToString(CultureInfo.InvariantCulture), P + "VisionEncoderLayer"))
                    {
                        b.Linear("projection", input, output);
                        if (i != layers - 1) b.RmsNorm("layer_norm", P + "RMSNorm", output);
                    }
                });
            }
            b.RmsNorm("final_norm", P + "RMSNorm", textHidden);
        }
    }

    /// <summary>
    /// <c>plan_out_scales</c>: the (time, height, width, channels) grid after each hMLP projection. Candidates are the raw
    /// pixel (1, 1, 1, C), spatial folds by the prime factors of patch_size (largest first, channels rounded up to a
    /// multiple of 64), then temporal folds by those of temporal_patch_size (channels h²·C·t·64: transformers 5.17 has no
    /// "/ 64" in this rounding, so a temporal grid used between two projections, as with the default 24 layers, is 64
    /// times wider than the reference hMLP's; the released four-layer tower only ends on it).
    /// The n_layers + 1 grids are the candidates closest to log-evenly spaced sizes: each row's nearest when there are
    /// at least as many layers as candidates, else one distinct candidate per row at the least total distance
    /// (scipy's linear_sum_assignment); the first and last are pinned to the raw pixel and the full patch.
    /// </summary>
    private static class VisionScales
    {
        public readonly record struct Scale(long T, long H, long W, long C);

        public static IReadOnlyList<Scale> Plan(long temporalPatch, long patch, long layers, long channels)
        {
            // transformers fails on an empty spatial ladder (patch_size 1); say so in one line.
            if (patch <= 1) throw new ConfigException("vision_config.patch_size must be greater than 1 for Inkling's hMLP");
            if (layers < 1) throw new ConfigException("vision_config.n_layers must be at least 1");
            var h = CumulativeProducts(PrimeFactors(patch));
            var t = CumulativeProducts(PrimeFactors(temporalPatch));
            var full = h[^1];
            var candidates = new List<Scale> { new(1, 1, 1, channels) };
            candidates.AddRange(h.Select(x => new Scale(1, x, x, (long)Math.Ceiling(x * x * channels / 64.0) * 64)));
            candidates.AddRange(t.Select(x => new Scale(x, full, full, full * full * channels * x * 64)));

            // In float32 as torch computes it: log sizes against linspace(0, log(total elements), n_layers + 1).
            var logSizes = candidates.Select(s => MathF.Log(s.T * s.H * s.W)).ToArray();
            var ideal = Linspace(0f, MathF.Log(patch * patch * temporalPatch * channels), (int)layers + 1);
            var cost = ideal.Select(x => logSizes.Select(y => MathF.Abs(x - y)).ToArray()).ToArray();
            var picks = layers >= candidates.Count
                ? cost.Select(row => Array.IndexOf(row, row.Min())).ToArray()
                : OrderedAssignment(cost);
            picks[0] = 0;
            picks[^1] = candidates.Count - 1;
            return picks.Select(i => candidates[i]).ToList();
        }

        /// <summary>Projection i's (input, output) width: the start grid's channels times the fold, to the end grid's
        /// channels (the text width for the last).</summary>
        public static (long Input, long Output) Projection(IReadOnlyList<Scale> scales, int i, long layers, long textHidden)
        {
            var (start, end) = (scales[i], scales[i + 1]);
            var fold = (end.T / start.T) * (end.H / start.H) * (end.W / start.W);
            return (start.C * fold, i == layers - 1 ? textHidden : end.C);
        }

        private static List<long> PrimeFactors(long n)
        {
            var factors = new List<long>();
            for (var p = 2L; p * p <= n; p++)
            {
                while (n % p == 0)
                {
                    factors.Add(p);
                    n /= p;
                }
            }
            if (n > 1) factors.Add(n);
            return factors;
        }

        /// <summary>Cumulative products of the factors, largest factor first.</summary>
        private static List<long> CumulativeProducts(List<long> ascending)
        {
            var products = new List<long>();
            var product = 1L;
            for (var i = ascending.Count - 1; i >= 0; i--) products.Add(product *= ascending[i]);
            return products;
        }

        /// <summary>torch.linspace in float32: the first half steps up from start, the second half down from end.</summary>
        private static float[] Linspace(float start, float end, int steps)
        {
            if (steps == 1) return [start];
            var step = (end - start) / (steps - 1);
            return Enumerable.Range(0, steps).Select(i => i < steps / 2 ? start + step * i : end - step * (steps - i - 1)).ToArray();
        }

        /// <summary>
        /// Minimal-cost assignment of rows to distinct columns (rows ≤ columns). The costs are distances between two
        /// increasing sequences, so an optimal assignment keeps the order: dynamic programming over (row, column).
        /// </summary>
        private static int[] OrderedAssignment(float[][] cost)
        {
            int rows = cost.Length, cols = cost[0].Length;
            var best = new double[rows + 1, cols + 1];
            for (var i = 1; i <= rows; i++)
            {
                for (var j = 0; j <= cols; j++)
                {
                    if (j < i)
                    {
                        best[i, j] = double.PositiveInfinity;
                        continue;
                    }
                    var take = best[i - 1, j - 1] + cost[i - 1][j - 1];
                    best[i, j] = j > i ? Math.Min(best[i, j - 1], take) : take;
                }
            }
            var picks = new int[rows];
            for (int i = rows, j = cols; i > 0; j--)
            {
                if (j > i && best[i, j] == best[i, j - 1]) continue; // column j - 1 unused
                picks[--i] = j - 1;
            }
            return picks;
        }
    }
}
