using System.Text.Json.Nodes;
using MoeLora.Cli.Commands;
using MoeLora.Cli.Infrastructure;
using MoeLora.Torch.IO;
using static TorchSharp.torch;

namespace MoeLora.Cli.Tests;

/// <summary>End-to-end runs of report --load-model, hidden-states and routers on the hf-tiny fixtures.</summary>
[Collection("cli")] // in-process runs share the static Consoles: one collection runs them one at a time
public sealed class RuntimeCommandTests : IDisposable
{
    static string Fixture(string model) => Path.Combine(AppContext.BaseDirectory, "Data", "hf-tiny", model);
    readonly string _tmp = Directory.CreateTempSubdirectory("moelora-cli-").FullName;
    public void Dispose() => Directory.Delete(_tmp, recursive: true);

    static (int Code, string Error) Run(params string[] args) => InProcessCli.Run(args);

    [Theory]
    [InlineData("mixtral")]
    [InlineData("deepseek_v3")]
    [InlineData("gpt_oss")]
    public void LoadModel_measured_counts_equal_predicted_and_gradient_follows_routing(string model)
    {
        var json = Path.Combine(_tmp, "r.json");
        var (code, err) = Run("report", Path.Combine(Fixture(model), "model"), "--load-model", "--lora-config",
            Path.Combine(Fixture(model), "attn_plus_experts", "adapter_config.json"), "--seq-length", "8", "--format", "json", "-o", json);
        Assert.True(code == 0, err);
        var m = JsonNode.Parse(File.ReadAllText(json))!["measured"]!;
        foreach (var row in m["rows"]!.AsArray())
            if (row!["figure"]!.GetValue<string>() != "process peak (VmHWM)")
                Assert.True(row["note"]!.GetValue<string>() == "equal", $"{row["figure"]}: {row["predicted"]} vs {row["measured"]}");
        var flow = m["gradient_flow"]!.AsArray();
        Assert.NotEmpty(flow);
        Assert.All(flow, f => Assert.True(f!["gradient_only_where_selected"]!.GetValue<bool>()));
    }

    [Fact]
    public void LoadModel_random_init_with_router_parameter_and_dora()
    {
        var json = Path.Combine(_tmp, "r.json");
        var (code, err) = Run("report", Path.Combine(Fixture("qwen3_moe"), "model"), "--load-model", "--init", "random",
            "--target-parameters", "mlp.gate.weight,mlp.experts.down_proj", "--seq-length", "8", "--format", "json", "-o", json);
        Assert.True(code == 0, err);
        var m = JsonNode.Parse(File.ReadAllText(json))!["measured"]!;
        Assert.Equal(6, m["adapter_instances"]!.GetValue<int>());
        (code, err) = Run("report", Path.Combine(Fixture("llama"), "model"), "--load-model", "--use-dora", "--seq-length", "8", "--format", "json", "-o", json);
        Assert.True(code == 0, err);
        var root = JsonNode.Parse(File.ReadAllText(json))!;
        Assert.Equal(root["lora"]!["trainable_parameters"]!.GetValue<long>(), root["measured"]!["trainable_parameters"]!.GetValue<long>());
    }

    // A tiny Llama4ForConditionalGeneration (the project's default model's class): vision tower, projector, text model.
    const string TinyLlama4Multimodal = """
        {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"],
         "vision_config": {"model_type": "llama4_vision_model", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 48, "vision_output_dim": 64, "image_size": 28, "patch_size": 14, "projector_input_dim": 64, "projector_output_dim": 64},
         "text_config": {"model_type": "llama4_text", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "intermediate_size_mlp": 96,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4,
           "num_experts_per_tok": 1, "interleave_moe_layer_step": 2, "attention_chunk_size": 32}}
        """;

    [Fact]
    public void LoadModel_random_init_on_a_multimodal_llama4_builds_its_tower_inert_and_counts_its_adapters()
    {
        var dir = Path.Combine(_tmp, "llama4");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "config.json"), TinyLlama4Multimodal);
        var json = Path.Combine(_tmp, "r.json");
        var (code, err) = Run("report", dir, "--load-model", "--init", "random", "--target-modules", "q_proj,k_proj,v_proj,o_proj",
            "--seq-length", "8", "--format", "json", "-o", json);
        Assert.True(code == 0, err);
        var root = JsonNode.Parse(File.ReadAllText(json))!;
        var m = root["measured"]!;
        foreach (var row in m["rows"]!.AsArray())
            if (row!["figure"]!.GetValue<string>() != "process peak (VmHWM)")
                Assert.True(row["note"]!.GetValue<string>() == "equal", $"{row["figure"]}: {row["predicted"]} vs {row["measured"]}");
        // 2 vision encoder layers and 2 text layers, q/k/v/o each: the tower's adapters are built and counted too.
        Assert.Equal(16, m["adapter_instances"]!.GetValue<int>());
        Assert.Equal(root["lora"]!["trainable_parameters"]!.GetValue<long>(), m["trainable_parameters"]!.GetValue<long>());
    }

    [Fact]
    public void LoadModel_memory_phases_leave_out_the_W_plus_delta_W_PEFT_would_build()
    {
        // MoeLora's experts run fused-expert LoRA as low-rank products: the predicted backward phase is weights,
        // adapters, their gradients and activations, with PEFT's materialised W+ΔW only reported beside it.
        var json = Path.Combine(_tmp, "r.json");
        var (code, err) = Run("report", Path.Combine(Fixture("qwen3_moe"), "model"), "--load-model", "--init", "random",
            "--target-parameters", "mlp.experts.gate_up_proj,mlp.experts.down_proj", "--seq-length", "8", "--format", "json", "-o", json);
        Assert.True(code == 0, err);
        var root = JsonNode.Parse(File.ReadAllText(json))!;
        var memory = root["measured"]!["memory"]!;
        long materialized = memory["peft_materialized_expert_bytes"]!.GetValue<long>();
        Assert.True(materialized > 0);
        Assert.All(memory["phases"]!.AsArray(), p => Assert.DoesNotContain("W+ΔW", p!["detail"]!.GetValue<string>()));
    }

    [Fact]
    public void LoadModel_refuses_a_model_that_does_not_fit_before_loading()
    {
        LoadModelMeasurement.AvailableBytesOverride = 1024;
        try
        {
            var (code, err) = Run("report", Path.Combine(Fixture("mixtral"), "model"), "--load-model");
            Assert.Equal(1, code);
            Assert.Contains("cannot be loaded on cpu", err);
            Assert.Single(err.Trim().Split('\n'));
        }
        finally { LoadModelMeasurement.AvailableBytesOverride = null; }
    }

    [Fact]
    public void Bad_inputs_give_one_line_errors()
    {
        var dir = Path.Combine(_tmp, "m");
        Directory.CreateDirectory(dir);
        var config = File.ReadAllText(Path.Combine(Fixture("mixtral"), "model", "config.json"));
        File.WriteAllText(Path.Combine(dir, "config.json"), config);
        File.WriteAllText(Path.Combine(dir, "model.safetensors.index.json"), "{\"weight_map\": {\"lm_head.weight\": \"model-00001-of-00002.safetensors\"}}");
        AssertError(["report", dir, "--load-model"], "missing shard");

        File.Delete(Path.Combine(dir, "model.safetensors.index.json"));
        File.Copy(Path.Combine(Fixture("mixtral"), "model", "model.safetensors"), Path.Combine(dir, "model.safetensors"));
        var o = JsonNode.Parse(config)!.AsObject();
        o["intermediate_size"] = o["intermediate_size"]!.GetValue<int>() * 2;
        File.WriteAllText(Path.Combine(dir, "config.json"), o.ToJsonString());
        AssertError(["report", dir, "--load-model"], "config.json implies");

        AssertError(["report", Path.Combine(Fixture("mixtral"), "model"), "--load-model", "--dtype", "fp8"], "unknown dtype");
        AssertError(["hidden-states", Path.Combine(Fixture("mixtral"), "model"), "--inputs", Path.Combine(_tmp, "none.safetensors"), "-o", Path.Combine(_tmp, "o.safetensors")], "does not exist");
        AssertError(["hidden-states", Path.Combine(Fixture("mixtral"), "model"), "--inputs", Path.Combine(Fixture("mixtral"), "reference.safetensors"), "--layers", "9", "-o", Path.Combine(_tmp, "o.safetensors")], "--layers 9");
    }

    void AssertError(string[] args, string expected)
    {
        var (code, err) = Run(args);
        Assert.True(code != 0, $"exit 0 for {string.Join(' ', args)}");
        Assert.Contains(expected, err);
        Assert.Single(err.Trim().Split('\n'));
    }

    [Theory]
    [InlineData("mixtral")]
    [InlineData("qwen2_moe")]
    [InlineData("llama4_text")]
    public void HiddenStates_match_the_reference(string model)
    {
        var outFile = Path.Combine(_tmp, "hs.safetensors");
        var reference = Path.Combine(Fixture(model), "reference.safetensors");
        var (code, err) = Run("hidden-states", Path.Combine(Fixture(model), "model"), "--inputs", reference, "--layers", "all", "-o", outFile);
        Assert.True(code == 0, err);
        var got = Safetensors.Load(outFile);
        var want = Safetensors.Load(reference);
        var mask = want["attention_mask"].to(ScalarType.Bool);
        foreach (var key in new[] { "hidden_states", "logits" })
        {
            Assert.Equal(want[key].shape, got[key].shape);
            var m = key == "logits" ? mask.unsqueeze(-1) : mask.unsqueeze(0).unsqueeze(-1);
            var diff = (got[key] - want[key]).abs().masked_fill(m.logical_not(), 0).max().item<float>();
            var scale = want[key].abs().masked_fill(m.logical_not(), 0).max().item<float>();
            Assert.True(diff <= 1e-4 * scale, $"{model} {key}: max diff {diff} (scale {scale})");
        }
        var (code2, stdout, err2) = InProcessCli.RunCapturing(100, "hidden-states", Path.Combine(Fixture(model), "model"), "--inputs", reference, "--layers", "0,2",
            "--dtype", "bf16", "-o", outFile, "--format", "json");
        Assert.True(code2 == 0, err2);
        // -o is the tensors file; --format shapes the printed summary.
        var summary = JsonNode.Parse(stdout)!;
        Assert.Equal("bf16", summary["dtype"]!.GetValue<string>());
        Assert.Equal(2, summary["hidden_states"]![0]!.GetValue<long>());
        var two = Safetensors.Load(outFile);
        Assert.Equal(2, two["hidden_states"].shape[0]);
        Assert.Equal(ScalarType.BFloat16, two["logits"].dtype);
    }

    /// <summary>
    /// HY-V4's hidden states are hyper-connection streams [B, S, n, H] before the normed [B, S, H]: they cannot stack, so
    /// each is written under hidden_states.{index}, as transformers' reference stores them, and equals it.
    /// </summary>
    [Fact]
    public void HiddenStates_of_different_shapes_are_written_one_key_per_state()
    {
        var dir = Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe", "hy_v4");
        var reference = Path.Combine(dir, "reference.safetensors");
        var outFile = Path.Combine(_tmp, "hs.safetensors");
        var (code, stdout, err) = InProcessCli.RunCapturing(100, "hidden-states", Path.Combine(dir, "model"), "--inputs", reference, "--layers", "all",
            "-o", outFile, "--format", "json");
        Assert.True(code == 0, err);
        var summary = JsonNode.Parse(stdout)!;
        Assert.Equal(new long[] { 2, 10, 4, 32 }, summary["hidden_states"]!["0"]!.AsArray().Select(d => d!.GetValue<long>()));
        var got = Safetensors.Load(outFile);
        var want = Safetensors.Load(reference);
        Assert.False(got.ContainsKey("hidden_states"));
        var mask = want["attention_mask"].to(ScalarType.Bool);
        for (int i = 0; i <= 4; i++)
        {
            var key = $"hidden_states.{i}";
            Assert.Equal(want[key].shape, got[key].shape);
            var m = mask.reshape(2, 10, 1).expand(2, 10, want[key].flatten(2).shape[2]);
            var diff = (got[key].flatten(2) - want[key].flatten(2)).abs().masked_fill(m.logical_not(), 0).max().item<float>();
            var scale = want[key].flatten(2).abs().masked_fill(m.logical_not(), 0).max().item<float>();
            Assert.True(diff <= 1e-4 * scale, $"{key}: max diff {diff} (scale {scale})");
        }
    }

    /// <summary>With a PEFT adapter applied, hidden states and logits equal transformers + PEFT's for that adapter.</summary>
    [Theory]
    [InlineData("mixtral", "attn_plus_experts")]
    [InlineData("qwen3_moe", "seed_targets")]
    [InlineData("llama", "seed_targets")]
    public void HiddenStates_with_an_adapter_match_peft(string model, string variant)
    {
        var outFile = Path.Combine(_tmp, "hs_adapter.safetensors");
        var inputs = Path.Combine(Fixture(model), "reference.safetensors");
        var (code, err) = Run("hidden-states", Path.Combine(Fixture(model), "model"), "--inputs", inputs,
            "--adapter", Path.Combine(Fixture(model), variant), "-o", outFile);
        Assert.True(code == 0, err);
        var got = Safetensors.Load(outFile);
        var want = Safetensors.Load(Path.Combine(Fixture(model), variant, "reference.safetensors"));
        var mask = Safetensors.Load(inputs)["attention_mask"].to(ScalarType.Bool);
        foreach (var key in new[] { "hidden_states", "logits" })
        {
            var m = key == "logits" ? mask.unsqueeze(-1) : mask.unsqueeze(0).unsqueeze(-1);
            var diff = (got[key] - want[key]).abs().masked_fill(m.logical_not(), 0).max().item<float>();
            var scale = want[key].abs().masked_fill(m.logical_not(), 0).max().item<float>();
            Assert.True(diff <= 1e-4 * scale, $"{model}/{variant} {key}: max diff {diff} (scale {scale})");
        }
    }

    [Fact]
    public void HiddenStates_prompts_are_tokenised_with_the_models_tokenizer_json()
    {
        var model = Path.Combine(_tmp, "model");
        Directory.CreateDirectory(model);
        foreach (var f in Directory.GetFiles(Path.Combine(Fixture("mixtral"), "model"))) File.Copy(f, Path.Combine(model, Path.GetFileName(f)));
        File.Copy(Path.Combine(AppContext.BaseDirectory, "Data", "tokenizers", "byte_level_bpe.json"), Path.Combine(model, "tokenizer.json"));
        var prompts = Path.Combine(_tmp, "p.jsonl");
        var ids = Path.Combine(_tmp, "i.jsonl");
        File.WriteAllLines(prompts, ["{\"prompt\": \"hello the world!\"}"]);
        File.WriteAllLines(ids, ["{\"input_ids\": [100, 15, 17, 20, 2, 7, 11]}"]); // worked out by hand in HfTokenizerTests
        var a = Path.Combine(_tmp, "a.safetensors");
        var b = Path.Combine(_tmp, "b.safetensors");
        var (code, err) = Run("hidden-states", model, "--prompts", prompts, "--layers", "all", "-o", a);
        Assert.True(code == 0, err);
        (code, err) = Run("hidden-states", model, "--prompts", ids, "--layers", "all", "-o", b);
        Assert.True(code == 0, err);
        var ta = Safetensors.Load(a);
        var tb = Safetensors.Load(b);
        foreach (var key in new[] { "hidden_states", "logits" })
            Assert.True(ta[key].equal(tb[key]).all().item<bool>(), key);
    }

    [Fact]
    public void Merge_writes_a_hub_checkpoint_with_the_adapted_logits()
    {
        var model = Path.Combine(Fixture("mixtral"), "model");
        var adapter = Path.Combine(Fixture("mixtral"), "attn_plus_experts");
        var outDir = Path.Combine(_tmp, "merged");
        var (code, err) = Run("merge", model, "--adapter", adapter, "-o", outDir);
        Assert.True(code == 0, err);
        var reference = Safetensors.Load(Path.Combine(Fixture("mixtral"), "reference.safetensors"));
        using var adapted = MoeLora.Torch.Models.TorchModelFactory.Load(model);
        MoeLora.Torch.Lora.LoraInjector.LoadPeftAdapter(adapted, adapter);
        adapted.Eval();
        using var merged = MoeLora.Torch.Models.TorchModelFactory.Load(outDir);
        merged.Eval();
        using var _ = no_grad();
        using var want = adapted.Forward(reference["input_ids"], reference["attention_mask"]);
        using var got = merged.Forward(reference["input_ids"], reference["attention_mask"]);
        var diff = (got.Logits - want.Logits).abs().max().item<float>();
        Assert.True(diff <= 1e-5 * want.Logits.abs().max().item<float>(), $"merged logits differ by {diff}");
        Assert.Contains(Safetensors.ReadHeader(Path.Combine(outDir, "model.safetensors")).Entries, e => e.Name == "model.layers.0.block_sparse_moe.experts.0.w1.weight");
        AssertError(["merge", model, "--adapter", _tmp, "-o", outDir], "adapter_config.json");
    }

    [Fact]
    public void Routers_write_frequencies_divergence_and_heatmap()
    {
        var h = Path.Combine(_tmp, "h.jsonl");
        var b = Path.Combine(_tmp, "b.jsonl");
        File.WriteAllLines(h, ["{\"input_ids\": [1, 5, 9, 20, 3]}", "{\"input_ids\": [7, 7, 7]}"]);
        File.WriteAllLines(b, ["{\"input_ids\": [100, 101, 102, 3, 4, 5]}"]);
        var json = Path.Combine(_tmp, "routers.json");
        var (code, err) = Run("routers", Path.Combine(Fixture("olmoe"), "model"), "--harmful", h, "--benign", b, "-o", json);
        Assert.True(code == 0, err);
        var root = JsonNode.Parse(File.ReadAllText(json))!;
        Assert.True(File.Exists(Path.ChangeExtension(json, ".png")));
        foreach (var layer in root["layers"]!.AsArray())
        {
            var hc = layer!["harmful_counts"]!.AsArray().Sum(x => x!.GetValue<long>());
            Assert.Equal(8 * 2, hc); // 8 tokens x top-2 (olmoe fixture)
            var js = layer["js_divergence"]!.GetValue<double>();
            Assert.InRange(js, 0, 1);
        }
        // The same result in the other formats: markdown into -o (named by --format), JSON on the terminal.
        var md = Path.Combine(_tmp, "routers.txt");
        (code, err) = Run("routers", Path.Combine(Fixture("olmoe"), "model"), "--harmful", h, "--benign", b, "-o", md, "--format", "markdown");
        Assert.True(code == 0, err);
        Assert.StartsWith("# Router selection:", File.ReadAllText(md));
        Assert.Contains("| MoE module | JS divergence |", File.ReadAllText(md));
        var (code2, stdout, err2) = InProcessCli.RunCapturing(100, "routers", Path.Combine(Fixture("olmoe"), "model"), "--harmful", h, "--benign", b,
            "--format", "json", "--heatmap", Path.Combine(_tmp, "hm.png"));
        Assert.True(code2 == 0, err2);
        Assert.Equal(root["layers"]!.AsArray().Count, JsonNode.Parse(stdout)!["layers"]!.AsArray().Count);
        Assert.Equal(0, RoutersCommand.JensenShannon([0.5, 0.5], [0.5, 0.5]), 12);
        Assert.Equal(1, RoutersCommand.JensenShannon([1, 0], [0, 1]), 12);
    }
}
