namespace MoeLora.Cli.Tests;

/// <summary>Every bad input: one line on stderr, a non-zero exit code, no stack trace, nothing half-written.</summary>
public class BadInputTests
{
    private static string TempConfig(string json)
    {
        var dir = Directory.CreateTempSubdirectory().FullName;
        File.WriteAllText(Path.Combine(dir, "config.json"), json);
        return dir;
    }

    [Fact]
    public void Malformed_config_json() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", TempConfig("{\"model_type\": \"llama\",")), 1, "not valid JSON");

    [Fact]
    public void Missing_model_type() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", TempConfig("{\"hidden_size\": 64}")), 1, "model_type");

    [Fact]
    public void Unknown_model_type_lists_supported_ones() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", TempConfig("{\"model_type\": \"bert\"}")), 1, "supported model types: ");

    [Fact]
    public void Wrong_field_type() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", TempConfig("{\"model_type\": \"llama\", \"hidden_size\": \"big\"}")), 1, "hidden_size");

    [Fact]
    public void Unknown_model_id() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "nobody/no-such-model"), 1);

    [Fact]
    public void Bad_regex() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "mistralai/Mixtral-8x7B-v0.1", "-t", ".*(q_proj"), 1, "regular expression");

    [Fact]
    public void Target_layer_out_of_range() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "mistralai/Mixtral-8x7B-v0.1", "--cb-target-layers", "40"), 1, "does not exist");

    [Fact]
    public void Nothing_matched_is_peft_s_error() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "mistralai/Mixtral-8x7B-v0.1", "-t", "w9"), 1, "not found in the base model");

    [Fact]
    public void Unsupported_module_type_is_peft_s_error() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "Qwen/Qwen2-57B-A14B", "-t", "gate"), 1, "is not supported");

    [Fact]
    public void Unknown_option_is_a_usage_error() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "--no-such-option"), 2);

    [Fact]
    public void Missing_lora_config_file() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "--lora-config", "/nonexistent/adapter_config.json"), 1, "does not exist");

    [Fact]
    public void Malformed_lora_config()
    {
        var dir = Directory.CreateTempSubdirectory().FullName;
        var file = Path.Combine(dir, "lora.json");
        File.WriteAllText(file, "{\"r\": \"sixteen\"}");
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "--lora-config", file), 1, "'r'");
    }

    private static string LoraFile(string name, string json)
    {
        var file = Path.Combine(Directory.CreateTempSubdirectory().FullName, name);
        File.WriteAllText(file, json);
        return file;
    }

    [Fact]
    public void Unknown_lora_keyword_is_peft_s_type_error() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "--lora-config", LoraFile("lora.json", "{\"r\": 4, \"lora_aplha\": 8}")), 1,
            "TypeError: LoraConfig.__init__() got an unexpected keyword argument 'lora_aplha' Hint: did you mean 'lora_alpha'.");

    [Fact]
    public void Lora_option_moelora_cannot_plan_is_refused_by_name() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "--lora-config", LoraFile("lora.json", "{\"layer_replication\": [[0, 2], [1, 3]]}")), 1,
            "layer_replication=[[0,2],[1,3]] is not supported");

    [Fact]
    public void Unknown_key_of_a_saved_adapter_config_is_dropped_as_peft_drops_it()
    {
        var file = LoraFile("adapter_config.json", "{\"peft_type\": \"LORA\", \"r\": 4, \"target_modules\": [\"q_proj\"], \"some_future_option\": 1}");
        var r = MoeloraProcess.Run("report", "mistralai/Mixtral-8x7B-v0.1", "--lora-config", file);
        Assert.True(r.ExitCode == 0, r.Stderr);
        Assert.Contains("some_future_option", r.Stdout);
    }

    [Fact]
    public void Non_positive_rank() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "-r", "0"), 2, "-r/--rank 0: must be at least 1");

    [Fact]
    public void Unknown_format() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "--format", "xml"), 2, "--format 'xml'");

    [Fact]
    public void Unknown_layout() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("modules", "--layout", "v3"), 2, "--layout 'v3'");

    [Fact]
    public void Failed_run_leaves_an_existing_output_untouched()
    {
        var dir = Directory.CreateTempSubdirectory().FullName;
        var file = Path.Combine(dir, "report.json");
        File.WriteAllText(file, "previous");
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "-t", "w9", "--output", file), 1);
        Assert.Equal("previous", File.ReadAllText(file));
    }

    [Fact]
    public void Output_into_a_missing_folder() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "--format", "json", "--output", "/nonexistent-dir/x.json"), 1, "does not exist");

    [Fact]
    public void Output_without_a_value_writes_nothing()
    {
        // Spectre.Console.Cli alone would take its internal token "__default_command" as the value and write that file.
        var dir = Directory.CreateTempSubdirectory().FullName;
        MoeloraProcess.AssertCleanError(MoeloraProcess.RunIn(dir, "report", "--output"), 2, "--output needs a value");
        Assert.Empty(Directory.EnumerateFileSystemEntries(dir));
    }

    [Theory]
    [InlineData("-t", "report", "-t")]
    [InlineData("--rank", "report", "--rank", "--lora-alpha", "8")]
    [InlineData("--target-modules", "train", "--preset", "tiny", "--target-modules")]
    public void Option_without_a_value_is_a_usage_error(string flag, params string[] args) =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run(args), 2, $"{flag} needs a value");

    [Fact]
    public void A_negative_number_is_a_value_not_an_option() =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("report", "--rank", "-3"), 2, "--rank -3: must be at least 1");
}
