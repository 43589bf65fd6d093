using System.Text.Json.Nodes;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Qwen4-Exp (<c>qwen4_exp</c>, <c>qwen4_exp_text</c>): the Qwen3.5 hybrid (Gated DeltaNet linear attention, every
/// <c>full_attention_interval</c>-th layer output-gated attention, per <c>layer_types</c>) and its MoE block (softmax
/// top-k router, fused experts, sigmoid-gated shared expert) in every layer, with three additions:
/// <list type="bullet">
/// <item>hyper-connections instead of pre-norm residuals: the hidden state is <c>hc_count</c> streams wide
/// (<c>hc_count·hidden_size</c>); each layer mixes them down before its attention (<c>attn_hyper_connection</c>) and
/// before its MoE block (<c>mlp_hyper_connection</c>), each a <c>Qwen4ExpTextGatedResidual</c> (grouped RMSNorm
/// <c>hc_norm</c>, low-rank mixer <c>input_mix_weight_down</c>/<c>_up</c> of rank <c>hc_lowrank</c>,
/// <c>block_inject_weight</c>), and the model's <c>hyper_connection_mixer</c> (no <c>block_inject_weight</c>) mixes
/// them into the last hidden state. The layers hold no input/post-attention norms and the model no final norm.</item>
/// <item>a QSA token indexer (<c>self_attn.indexer</c>) in every attention layer, built unconditionally: the five
/// <c>indexer_*</c> fields default to None and transformers fails to build such a layer without them.</item>
/// <item>per-layer n-gram embeddings (PLE, <c>ple</c>) on the one-indexed <c>ple_layer_ids</c>: a hashed n-gram
/// <c>nn.Embedding</c> whose rows are the (padded) sum of one prime vocabulary per n-gram head, key/value projections,
/// three grouped RMSNorms and a dilated depthwise Conv1d.</item>
/// </list>
/// <para>
/// As for Qwen3.5-MoE, a <c>qwen4_exp</c> config builds the class its <c>architectures</c> names; without one,
/// <c>AutoModelForCausalLM</c> builds the text-only <c>Qwen4ExpForCausalLM</c> (its class config is
/// <c>Qwen4ExpTextConfig</c>) over <c>text_config</c>, whose model_type (<c>qwen4_exp_text</c>) PEFT then reads.
/// <c>Qwen4ExpForConditionalGeneration</c> nests <c>model.visual</c> (the Qwen3-VL vision tower without deepstack
/// mergers) and <c>model.language_model</c>.
/// </para>
/// <para>
/// <see cref="Layout.V4"/> is the on-disk layout transformers 5.17's <c>qwen4_exp_text</c> conversion writes:
/// per-expert <c>mlp.experts.{e}.gate_proj/up_proj/down_proj</c>, and each PLE n-gram table as
/// <c>ngram_embedding.shard_{i}.weight</c>, <c>split_ngram_parts</c> row blocks (<c>torch.chunk</c> sizes assumed), under
/// the v5 module names; for the multimodal class the same rule is applied under <c>model.language_model</c>, as for
/// Qwen3.5-MoE.
/// </para>
/// <para>
/// Layer types: <c>linear_attention</c> builds <c>linear_attn</c>, every other type <c>self_attn</c> with its indexer
/// (the decoder layer tests only for <c>linear_attention</c>). The stored sources disagree on the attention type's
/// name (<c>qwen_sparse_attention</c>, with <c>full_attention</c> rewritten to it, or <c>deepseek_sparse_attention</c>
/// and <c>hybrid_indexed</c>); all of them are accepted.
/// </para>
/// </summary>
internal sealed class Qwen4ExpFamily : IArchitecture
{
    private const string P = "Qwen4Exp";
    private const string T = "Qwen4ExpText";

    // The attention layer names layer_types may use, the default first; which one a layer carries does not change the tree.
    private static readonly string[] AttentionTypes = ["qwen_sparse_attention", "full_attention", "deepseek_sparse_attention", "hybrid_indexed"];

    public IReadOnlyList<string> ModelTypes => ["qwen4_exp", "qwen4_exp_text"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var composite = c.ModelType == "qwen4_exp";
        var multimodal = composite && Blocks.HeadClass(c, P + "ForCausalLM", P + "ForConditionalGeneration") == P + "ForConditionalGeneration";
        var text = composite ? Blocks.SubOrDefaults(c, "text_config") : c;

        // Defaults: Qwen4ExpTextConfig.
        var vocab = text.Positive("vocab_size", 248320);
        var hidden = text.Positive("hidden_size", 2048);
        var layers = text.Positive("num_hidden_layers", 40);
        var heads = text.Positive("num_attention_heads", 16);
        var kv = text.Positive("num_key_value_heads", 2);
        var headDim = Blocks.HeadDim(text, hidden, heads, classDefault: 256);
        var lin = Blocks.QwenLinearAttentionDims.Read(text);
        var experts = text.Positive("num_experts", 512);
        var topK = text.Positive("num_experts_per_tok", 10);
        if (topK > experts)
            throw new ConfigException($"config field 'num_experts_per_tok' ({topK}) must not exceed num_experts ({experts})");
        var moeInter = text.Positive("moe_intermediate_size", 512);
        var sharedInter = text.Positive("shared_expert_intermediate_size", 512);
        var normTopK = text.Bool("norm_topk_prob", true);
        var bias = text.Bool("attention_bias", false);
        var act = text.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var streams = text.Positive("hc_count", 4);
        if (streams < 2) throw new ConfigException($"config field 'hc_count' must be > 1 (Qwen4ExpTextConfig), got {streams}");
        var lowRank = text.Positive("hc_lowrank", 320);
        var layerTypes = Blocks.QwenHybridLayerTypes(text, layers, AttentionTypes);
        var indexer = layerTypes.Any(t => t != "linear_attention") ? QsaIndexer.Read(text) : null;
        var ple = Ple.Read(text, hidden, layers);
        // The multimodal class ties by its own config; the causal LM by the (text) config it runs on.
        var tie = multimodal ? c.Bool("tie_word_embeddings", false) : text.Bool("tie_word_embeddings", false);

        var b = new TreeBuilder(multimodal ? P + "ForConditionalGeneration" : P + "ForCausalLM", layout);
        var wide = streams * hidden;

        // Qwen4ExpTextGatedResidual: the grouped RMSNorm over all streams, the low-rank mixer, and (except on the model's
        // final mixer) the per-stream injection weights.
        void GatedResidual(string name, bool combine)
        {
            using (b.Scope(name, T + "GatedResidual", ModuleLocation.Other))
            {
                b.RmsNorm("hc_norm", T + "RMSNorm", wide, ModuleLocation.Norm);
                b.Linear("input_mix_weight_down", wide, lowRank);
                b.Linear("input_mix_weight_up", lowRank, wide);
                if (combine) b.Linear("block_inject_weight", wide, streams);
            }
        }

        void Indexer()
        {
            using (b.Scope("indexer", T + "QSAIndexer"))
            {
                b.Linear("index_qk_proj", hidden, (indexer!.Heads + indexer.KvHeads) * indexer.HeadDim);
                b.RmsNorm("q_layernorm", T + "RMSNorm", indexer.HeadDim);
                b.RmsNorm("k_layernorm", T + "RMSNorm", indexer.HeadDim);
            }
        }

        void PleLayer(int pleIndex)
        {
            var rows = ple.TableRows(pleIndex);
            using (b.Scope("ple", T + "PLELayer", ModuleLocation.Other))
            {
                using (b.Scope("ple_embedding", T + "NGramEmbedding", ModuleLocation.Embedding))
                {
                    // Persistent buffers (nn.Buffer): the hash multipliers and each head's vocabulary size and offset.
                    b.Buffer("layer_multipliers", ple.NgramSize);
                    b.Buffer("ngram_heads_vocab_sizes", ple.NgramHeads);
                    b.Buffer("ngram_heads_offsets", ple.NgramHeads);
                    if (layout == Layout.V5) b.Embedding("ngram_embedding", rows, ple.HeadDim);
                    else
                    {
                        // On disk only: the table's row blocks (no module of these names exists at run time).
                        using (b.Scope("ngram_embedding", "Embedding", ModuleLocation.Embedding))
                        {
                            var shard = 0;
                            foreach (var shardRows in ple.ShardRows(rows))
                            {
                                using (b.Scope("shard_" + shard++.ToString(System.Globalization.CultureInfo.InvariantCulture), "Shard", kind: ModuleKind.Other))
                                    b.Param("weight", shardRows, ple.HeadDim);
                            }
                        }
                    }
                }
                b.Linear("key_proj", ple.EmbedDim, wide);
                b.Linear("value_proj", ple.EmbedDim, hidden);
                b.RmsNorm("norm_key", T + "RMSNorm", wide, ModuleLocation.Norm);
                b.RmsNorm("norm_query", T + "RMSNorm", wide, ModuleLocation.Norm);
                b.RmsNorm("norm_conv", T + "RMSNorm", wide, ModuleLocation.Norm);
                // A depthwise, dilated nn.Conv1d (no bias): all-linear never selects it.
                using (b.Scope("conv1d", "Conv1d", kind: ModuleKind.Other))
                    b.Param("weight", wide, 1, ple.ConvKernel);
            }
        }

        void Layer(int i)
        {
            if (layerTypes[i] == "linear_attention") Blocks.QwenGatedDeltaNet(b, T, hidden, lin);
            else Blocks.QwenGatedAttention(b, T, hidden, heads, kv, headDim, bias, Indexer);
            Blocks.QwenSharedExpertMoe(b, layout, T, experts, hidden, moeInter, sharedInter, actClass);
            if (ple.IndexOf(i) is int pleIndex) PleLayer(pleIndex);
            GatedResidual("attn_hyper_connection", combine: true);
            GatedResidual("mlp_hyper_connection", combine: true);
        }

        void TextModel(string attr) => Blocks.TextModel(b, attr, T + "Model", T + "DecoderLayer", vocab, hidden, layers, Layer,
            normClass: null, T + "RotaryEmbedding", tail: () => GatedResidual("hyper_connection_mixer", combine: false));

        var textModel = "model";
        if (multimodal)
        {
            textModel = "model.language_model";
            using (b.Scope("model", P + "Model"))
            {
                Blocks.QwenVisionTower(b, "visual", P, Blocks.SubOrDefaults(c, "vision_config"), layout, deepstack: false);
                TextModel("language_model");
            }
        }
        else
        {
            TextModel("model");
        }
        Blocks.LmHead(b, hidden, vocab, tie, textModel + ".embed_tokens");

        var routing = $"softmax over {experts} experts, top-{topK}{(normTopK ? ", renormalised" : "")}, plus a sigmoid-gated shared expert";
        var moe = new MoeFacts(experts, topK, 1, moeInter, sharedInter, Enumerable.Range(0, (int)layers).ToList(), [], routing);
        var modelType = composite && !multimodal ? text.ModelType ?? "qwen4_exp_text" : c.ModelType!;
        var spec = Blocks.NestedSpec(c, text, modelType, b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act, textModel);
        return spec with
        {
            RuntimeUnavailable = "Qwen4-Exp's hyper-connection residual streams, QSA token indexer and n-gram per-layer embeddings",
        };
    }

    /// <summary>The QSA indexer's sizes: every field is required once an attention layer exists (no defaults).</summary>
    private sealed record QsaIndexer(long Heads, long KvHeads, long HeadDim)
    {
        public static QsaIndexer Read(ModelConfig text)
        {
            long Required(string name) => text.IntOrNull(name, null) is long v
                ? v > 0 ? v : throw new ConfigException($"config field '{name}' must be a positive integer, got {v}")
                : throw new ConfigException($"config field '{name}' must be set: Qwen4-Exp builds a QSA indexer in every attention layer " +
                                            "(transformers 5.17 fails on None // None without it)");
            var heads = Required("indexer_n_heads");
            var kvHeads = Required("indexer_kv_heads");
            var headDim = Required("indexer_head_dim");
            var budget = Required("indexer_budget");
            var ratio = Required("indexer_compress_ratio");
            if (kvHeads != 1) throw new ConfigException($"config field 'indexer_kv_heads' must be 1 (Qwen4-Exp QSA), got {kvHeads}");
            if (budget % ratio != 0)
                throw new ConfigException($"config field 'indexer_budget' ({budget}) must be divisible by indexer_compress_ratio ({ratio})");
            return new QsaIndexer(heads, kvHeads, headDim);
        }
    }

    /// <summary>
    /// The per-layer n-gram embedding settings. Head <c>g</c> of PLE layer <c>k</c> (its position in the sorted
    /// <c>ple_layer_ids</c>) has the (k·heads + g + 1)-th prime at or above <c>ngram_vocab_size_base</c> as its vocabulary;
    /// a layer's table holds their sum rounded up to <c>make_ngram_vocab_size_divisible_by</c> rows of
    /// <c>ple_embed_dim / heads</c>, heads = (ngram_size − 1)·heads_per_ngram.
    /// </summary>
    private sealed record Ple(IReadOnlyList<long> LayerIds, long EmbedDim, long ConvKernel, long NgramSize, long NgramHeads,
        long VocabBase, long Divisor, long SplitParts)
    {
        public long HeadDim => EmbedDim / NgramHeads;

        public static Ple Read(ModelConfig text, long hidden, long layers)
        {
            // Defaults: Qwen4ExpTextConfig (ple_layer_ids None → [], ple_embed_dim None → hidden_size).
            var ids = (text.IntList("ple_layer_ids") ?? []).Distinct().Order().ToList();
            var embedDim = text.IntOrNull("ple_embed_dim", null) ?? hidden;
            var kernel = text.Positive("ple_conv_kernel_size", 4);
            var ngramSize = text.Int("ngram_size", 3);
            var headsPerNgram = text.Int("heads_per_ngram", 8);
            var vocabBase = text.Int("ngram_vocab_size_base", 20_000_000);
            var divisor = text.Positive("make_ngram_vocab_size_divisible_by", 128);
            var parts = text.Positive("split_ngram_parts", 512);
            var ngramHeads = (ngramSize - 1) * headsPerNgram;
            if (ids.Count > 0)
            {
                if (ngramHeads <= 0 || embedDim <= 0 || embedDim % ngramHeads != 0)
                    throw new ConfigException($"config field 'ple_embed_dim' ({embedDim}) must be a positive multiple of the " +
                                              $"{ngramHeads} n-gram heads ((ngram_size - 1) * heads_per_ngram)");
                var outside = ids.Where(id => id < 1 || id > layers).ToList();
                if (outside.Count > 0)
                    throw new ConfigException($"config field 'ple_layer_ids' holds {outside[0]}; one-indexed layer ids lie in [1, {layers}]");
                if (!HasEos(text))
                    throw new ConfigException("config field 'eos_token_id' must be set when Qwen4-Exp PLE layers are enabled");
            }
            return new Ple(ids, embedDim, kernel, ngramSize, ngramHeads, vocabBase, divisor, parts);
        }

        private static bool HasEos(ModelConfig text) =>
            text.Json.TryGetPropertyValue("eos_token_id", out var v) && v is not null && (v is not JsonArray a || a.Count > 0);

        /// <summary>The position of layer <paramref name="layer"/> (zero-indexed) among the PLE layers, or null.</summary>
        public int? IndexOf(int layer)
        {
            var k = LayerIds.ToList().IndexOf(layer + 1);
            return k < 0 ? null : k;
        }

        /// <summary>The padded rows of PLE layer <paramref name="pleIndex"/>'s n-gram table.</summary>
        public long TableRows(int pleIndex)
        {
            var primes = PrimesFrom(VocabBase, (pleIndex + 1) * NgramHeads);
            var total = primes.Skip((int)(pleIndex * NgramHeads)).Sum();
            return (total + Divisor - 1) / Divisor * Divisor;
        }

        /// <summary>The checkpoint's row blocks of one table: <c>split_ngram_parts</c> chunks as <c>torch.chunk</c> cuts them.</summary>
        public IEnumerable<long> ShardRows(long rows)
        {
            var size = (rows + SplitParts - 1) / SplitParts;
            for (long at = 0; at < rows; at += size) yield return Math.Min(size, rows - at);
        }

        /// <summary>The first <paramref name="count"/> primes at or above <paramref name="start"/> (<c>_find_nth_prime_after(start - 1, n)</c>).</summary>
        private static List<long> PrimesFrom(long start, long count)
        {
            var primes = new List<long>();
            for (var v = Math.Max(start, 2); primes.Count < count; v++)
                if (IsPrime(v)) primes.Add(v);
            return primes;
        }

        private static bool IsPrime(long v)
        {
            if (v < 2) return false;
            if (v % 2 == 0) return v == 2;
            for (long d = 3; d * d <= v; d += 2)
                if (v % d == 0) return false;
            return true;
        }
    }
}
