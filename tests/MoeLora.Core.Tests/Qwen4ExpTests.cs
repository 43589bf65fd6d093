using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Tests;

/// <summary>
/// Qwen4-Exp facts that follow from transformers' sources alone (no oracle data yet): the QSA indexer every attention
/// layer builds needs its indexer_* fields, and a PLE layer's n-gram table holds its heads' prime vocabularies,
/// padded. Also that the checkpoint layout maps a table to its on-disk shards.
/// </summary>
public class Qwen4ExpTests
{
    // The overrides tools/oracle/discover_moe.py applies to the shrunk default config.
    private static JsonObject TinyText() => new()
    {
        ["model_type"] = "qwen4_exp_text",
        ["vocab_size"] = 128, ["hidden_size"] = 64, ["num_hidden_layers"] = 4, ["num_attention_heads"] = 4,
        ["num_key_value_heads"] = 2, ["head_dim"] = 24, ["linear_key_head_dim"] = 16, ["linear_value_head_dim"] = 16,
        ["linear_num_key_heads"] = 2, ["linear_num_value_heads"] = 4, ["moe_intermediate_size"] = 48,
        ["shared_expert_intermediate_size"] = 80, ["num_experts"] = 4, ["num_experts_per_tok"] = 2,
        ["layer_types"] = new JsonArray("linear_attention", "linear_attention", "linear_attention", "qwen_sparse_attention"),
        ["indexer_n_heads"] = 2, ["indexer_kv_heads"] = 1, ["indexer_head_dim"] = 32, ["indexer_budget"] = 4,
        ["indexer_compress_ratio"] = 2, ["hc_count"] = 3, ["hc_lowrank"] = 16, ["ple_layer_ids"] = new JsonArray(2, 3),
        ["ple_embed_dim"] = 40, ["heads_per_ngram"] = 2, ["ngram_vocab_size_base"] = 8,
        ["make_ngram_vocab_size_divisible_by"] = 16, ["split_ngram_parts"] = 4, ["eos_token_id"] = 1,
    };

    private static long[] Shape(ModelSpec spec, string name) => spec.Tree.Parameters.Single(p => p.Name == name).Shape;

    [Theory]
    [InlineData("qwen4_exp")]
    [InlineData("qwen4_exp_text")]
    public void A_default_config_does_not_build(string type)
    {
        // Qwen4ExpTextQSAIndexer.__init__ computes indexer_budget // indexer_compress_ratio, both None by default.
        var e = Assert.Throws<ConfigException>(() =>
            ArchitectureRegistry.Build(new ModelConfig(new JsonObject { ["model_type"] = type }), Layout.V5));
        Assert.Contains("indexer_n_heads", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Ngram_tables_hold_each_layers_prime_vocabularies_padded()
    {
        var spec = ArchitectureRegistry.Build(new ModelConfig(TinyText()), Layout.V5);
        // Heads 0-3 of the first PLE layer: primes 11, 13, 17, 19 (60, padded to 64); of the second: 23, 29, 31, 37 (120 → 128).
        // Each head embeds ple_embed_dim / (ngram_size - 1) / heads_per_ngram = 40 / 4 = 10 dims.
        Assert.Equal([64L, 10], Shape(spec, "model.layers.1.ple.ple_embedding.ngram_embedding.weight"));
        Assert.Equal([128L, 10], Shape(spec, "model.layers.2.ple.ple_embedding.ngram_embedding.weight"));
        Assert.Equal([192L, 40], Shape(spec, "model.layers.1.ple.key_proj.weight"));
        Assert.Equal([192L, 1, 4], Shape(spec, "model.layers.2.ple.conv1d.weight"));
        Assert.Equal([96L, 64], Shape(spec, "model.layers.3.self_attn.indexer.index_qk_proj.weight"));
        Assert.DoesNotContain(spec.Tree.Parameters, p => p.Name.StartsWith("model.layers.0.ple", StringComparison.Ordinal));
        Assert.DoesNotContain(spec.Tree.Parameters, p => p.Name.StartsWith("model.norm", StringComparison.Ordinal));
    }

    [Fact]
    public void The_checkpoint_layout_concatenates_a_tables_shards()
    {
        var spec = ArchitectureRegistry.Build(new ModelConfig(TinyText()), Layout.V5);
        var alt = CheckpointLayout.For(spec)!.For("model.layers.2.ple.ple_embedding.ngram_embedding.weight")!;
        Assert.True(alt.Concatenated);
        Assert.Equal(Enumerable.Range(0, 4).Select(i => $"model.layers.2.ple.ple_embedding.ngram_embedding.shard_{i}.weight"),
            alt.Parts.Select(p => p.Name));
        Assert.All(alt.Parts, p => Assert.Equal([32L, 10], p.Shape));
    }
}
