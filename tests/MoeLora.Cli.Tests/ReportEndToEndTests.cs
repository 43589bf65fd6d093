using System.Text.Json.Nodes;

namespace MoeLora.Cli.Tests;

/// <summary>The real <c>moelora</c> process: outputs, the JSON contract and exit codes.</summary>
public class ReportEndToEndTests
{
    [Fact]
    public void Default_report_analyses_llama4_scout_from_the_catalog()
    {
        var r = MoeloraProcess.Run("report");
        Assert.Equal(0, r.ExitCode);
        Assert.Contains("meta-llama/Llama-4-Scout-17B-16E-Instruct", r.Stdout);
        // peft 0.21 on transformers 5.17 (oracle): seed targets reach attention, shared experts and the vision tower.
        Assert.Contains("trainable params: 61,964,288 || all params: 108,703,757,824", r.Stdout);
        Assert.Contains("No adapter reaches the routed experts", r.Stdout);
        Assert.Equal("", r.Stderr);
    }

    [Fact]
    public void Json_report_follows_the_contract()
    {
        var r = MoeloraProcess.Run("report", "mistralai/Mixtral-8x7B-v0.1", "--format", "json");
        Assert.Equal(0, r.ExitCode);
        var j = JsonNode.Parse(r.Stdout)!;
        Assert.Equal("moelora.report/1", j["schema"]!.GetValue<string>());
        Assert.Equal("mistralai/Mixtral-8x7B-v0.1", j["model"]!["id"]!.GetValue<string>());
        Assert.Equal("mixtral", j["model"]!["model_type"]!.GetValue<string>());
        Assert.Equal("MixtralForCausalLM", j["model"]!["architecture"]!.GetValue<string>());
        Assert.Equal(46702792704, j["model"]!["num_parameters"]!.GetValue<long>());
        Assert.Equal(13631488, j["lora"]!["trainable_parameters"]!.GetValue<long>());
        Assert.Equal(46716424192, j["lora"]!["all_parameters"]!.GetValue<long>());
        var tensors = j["lora"]!["adapter_tensors"]!.AsObject();
        Assert.Equal(256, tensors.Count);
        Assert.Equal("[16,4096]", tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]!.ToJsonString());
        var target = j["lora"]!["targets"]![0]!;
        foreach (var key in new[] { "name", "kind", "location", "r", "alpha" }) Assert.NotNull(target[key]);
        Assert.Contains(j["warnings"]!.AsArray(), w => w!["code"]!.GetValue<string>() == "experts_missed");
        var sum = tensors.Sum(kv => kv.Value!.AsArray().Aggregate(1L, (a, b) => a * b!.GetValue<long>()));
        Assert.Equal(j["lora"]!["trainable_parameters"]!.GetValue<long>(), sum);
    }

    [Fact]
    public void Target_parameters_reach_the_fused_experts()
    {
        var r = MoeloraProcess.Run("report", "Qwen/Qwen3-30B-A3B", "--format", "json", "-t", "q_proj,k_proj,v_proj,o_proj",
            "--target-parameters", "experts.gate_up_proj,experts.down_proj");
        Assert.Equal(0, r.ExitCode);
        var j = JsonNode.Parse(r.Stdout)!;
        Assert.Equal(642514944, j["lora"]!["trainable_parameters"]!.GetValue<long>()); // oracle, peft 0.21
        Assert.Equal("per-expert slices of fused LoRA tensors", j["lora"]!["experts"]!["mode"]!.GetValue<string>());
    }

    [Fact]
    public void Lora_config_file_is_read_with_peft_names()
    {
        var dir = Directory.CreateTempSubdirectory().FullName;
        var file = Path.Combine(dir, "adapter_config.json");
        File.WriteAllText(file, """{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ".*\\.(q_proj|v_proj)", "task_type": "CAUSAL_LM"}""");
        var r = MoeloraProcess.Run("report", "mistralai/Mixtral-8x7B-v0.1", "--lora-config", file, "--format", "json");
        Assert.Equal(0, r.ExitCode);
        Assert.Equal(6815744, JsonNode.Parse(r.Stdout)!["lora"]!["trainable_parameters"]!.GetValue<long>()); // oracle regex_qv
        var fromFolder = MoeloraProcess.Run("report", "mistralai/Mixtral-8x7B-v0.1", "--lora-config", dir, "--format", "json");
        Assert.Equal(r.Stdout, fromFolder.Stdout);
    }

    [Fact]
    public void Markdown_goes_to_the_output_file()
    {
        var dir = Directory.CreateTempSubdirectory().FullName;
        var file = Path.Combine(dir, "report.md");
        var r = MoeloraProcess.Run("report", "meta-llama/Meta-Llama-3.1-8B", "--format", "markdown", "--output", file);
        Assert.Equal(0, r.ExitCode);
        Assert.Equal("", r.Stdout);
        var text = File.ReadAllText(file);
        Assert.StartsWith("# MoE LoRA report: meta-llama/Meta-Llama-3.1-8B", text);
        Assert.Contains("trainable params: 41,943,040", text);
        // Self-contained: the three charts are embedded, not linked.
        Assert.Equal(3, System.Text.RegularExpressions.Regex.Matches(text, @"!\[[^\]]+\]\(data:image/svg\+xml;base64,").Count);
        Assert.Empty(Directory.GetFiles(dir, "*.tmp"));
    }

    [Fact]
    public void Local_folder_and_config_file_are_models()
    {
        var dir = Directory.CreateTempSubdirectory().FullName;
        File.WriteAllText(Path.Combine(dir, "config.json"), """
            {"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "num_local_experts": 4,
             "num_experts_per_tok": 2, "head_dim": null}
            """);
        var fromDir = MoeloraProcess.Run("report", dir, "--format", "json", "-t", "q_proj", "-r", "2");
        var fromFile = MoeloraProcess.Run("report", Path.Combine(dir, "config.json"), "--format", "json", "-t", "q_proj", "-r", "2");
        Assert.Equal(0, fromDir.ExitCode);
        Assert.Equal(0, fromFile.ExitCode);
        // 2 layers × r(in + out) = 2 × 2 × (64 + 64)
        Assert.Equal(512, JsonNode.Parse(fromDir.Stdout)!["lora"]!["trainable_parameters"]!.GetValue<long>());
        Assert.Equal(JsonNode.Parse(fromDir.Stdout)!["lora"]!["adapter_tensors"]!.ToJsonString(),
            JsonNode.Parse(fromFile.Stdout)!["lora"]!["adapter_tensors"]!.ToJsonString());
    }

    [Fact]
    public void Modules_json_lists_named_modules_and_parameters()
    {
        var r = MoeloraProcess.Run("modules", "openai/gpt-oss-20b", "--format", "json");
        Assert.Equal(0, r.ExitCode);
        var j = JsonNode.Parse(r.Stdout)!;
        Assert.Equal(271, j["modules"]!.AsArray().Count);
        Assert.Equal(411, j["parameters"]!.AsArray().Count);
        Assert.Equal("[\"model.layers.0.self_attn.sinks\",[64]]", j["parameters"]![1]!.ToJsonString());
    }

    [Fact]
    public void Models_lists_the_catalog_and_marks_partial_copies()
    {
        var r = MoeloraProcess.Run("models", "--format", "json");
        Assert.Equal(0, r.ExitCode);
        var models = JsonNode.Parse(r.Stdout)!["models"]!.AsArray();
        Assert.Equal(18, models.Count); // every file of the embedded catalog
        Assert.Contains(models, m => m!["id"]!.GetValue<string>() == "deepseek-ai/DeepSeek-V3");
        Assert.True(models.Single(m => m!["id"]!.GetValue<string>() == "meta-llama/Llama-4-Scout-17B-16E-Instruct")!["partial"]!.GetValue<bool>());
    }

    [Fact]
    public void V4_layout_has_per_expert_modules_and_the_same_total()
    {
        var v4 = JsonNode.Parse(MoeloraProcess.Run("modules", "mistralai/Mixtral-8x7B-v0.1", "--layout", "v4", "--format", "json").Stdout)!;
        var v5 = JsonNode.Parse(MoeloraProcess.Run("modules", "mistralai/Mixtral-8x7B-v0.1", "--format", "json").Stdout)!;
        Assert.Equal(v5["num_parameters"]!.GetValue<long>(), v4["num_parameters"]!.GetValue<long>());
        Assert.Contains(v4["modules"]!.AsArray(), m => m![0]!.GetValue<string>() == "model.layers.0.block_sparse_moe.experts.7.w3");
    }
}

/// <summary>Checkpoints on disk: the header cross-check and analysis of unknown model types from headers.</summary>
public class CheckpointEndToEndTests
{
    private static string Tiny(string type) => Path.Combine(AppContext.BaseDirectory, "Data", "hf-tiny", type, "model");

    [Fact]
    public void Local_checkpoint_is_cross_checked()
    {
        var r = MoeloraProcess.Run("report", Tiny("mixtral"), "--format", "json");
        Assert.Equal(0, r.ExitCode);
        var c = JsonNode.Parse(r.Stdout)!["checkpoint"]!;
        Assert.True(c["clean"]!.GetValue<bool>());
        Assert.Equal(1, c["files"]!.GetValue<int>());
    }

    [Fact]
    public void Unknown_model_type_is_derived_from_headers_and_labelled()
    {
        var dir = Directory.CreateTempSubdirectory().FullName;
        foreach (var f in Directory.GetFiles(Tiny("mixtral"))) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        var config = Path.Combine(dir, "config.json");
        File.WriteAllText(config, File.ReadAllText(config).Replace("\"mixtral\"", "\"mystery_moe\"", StringComparison.Ordinal));
        var r = MoeloraProcess.Run("report", dir, "--format", "json", "-t", "q_proj,w1,w2,w3", "-r", "4");
        Assert.Equal(0, r.ExitCode);
        var j = JsonNode.Parse(r.Stdout)!;
        Assert.True(j["checkpoint"]!["derived"]!.GetValue<bool>());
        Assert.Equal("derived", j["model"]!["layout"]!.GetValue<string>());
        // 3 layers: q_proj 4·(32+32) + 4 experts × (w1 4·(32+64) + w2 4·(64+32) + w3 4·(32+64))
        Assert.Equal(3 * (256 + 4 * 3 * 384), j["lora"]!["trainable_parameters"]!.GetValue<long>());
    }
}

/// <summary>Help renders for every command (descriptions are Spectre markup: a stray bracket breaks them).</summary>
public class HelpTests
{
    [Theory]
    [InlineData("--help")]
    [InlineData("report", "--help")]
    [InlineData("modules", "--help")]
    [InlineData("models", "--help")]
    [InlineData("plan", "--help")]
    [InlineData("diff", "--help")]
    [InlineData("train", "--help")]
    [InlineData("eval", "--help")]
    [InlineData("hidden-states", "--help")]
    [InlineData("routers", "--help")]
    public void Help_renders(params string[] args)
    {
        var r = MoeloraProcess.Run(args);
        Assert.Equal(0, r.ExitCode);
        Assert.Equal("", r.Stderr);
        Assert.Contains("USAGE:", r.Stdout);
    }
}
