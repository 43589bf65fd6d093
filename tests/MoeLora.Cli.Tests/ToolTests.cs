namespace MoeLora.Cli.Tests;

/// <summary>The installed tool on its own: --version, and the tiny preset from a folder outside the repository.</summary>
public class ToolTests
{
    [Fact]
    public void Version_names_the_tool_and_the_reproduced_libraries()
    {
        var r = MoeloraProcess.Run("--version");
        Assert.Equal(0, r.ExitCode);
        Assert.Matches(@"^moelora \d+\.\d+\.\d+", r.Stdout);
        Assert.Contains($"transformers {MoeLora.Core.Reproduced.Transformers}, PEFT {MoeLora.Core.Peft.PeftVersion.Default}", r.Stdout);
        Assert.Contains("TorchSharp 0.", r.Stdout);
    }

    [Fact]
    public void Tiny_preset_trains_from_any_folder_with_its_embedded_data()
    {
        // A folder with no data/tiny above it: the preset's JSONL must come from inside the tool.
        var dir = Directory.CreateTempSubdirectory("moelora-anywhere-").FullName;
        try
        {
            for (var d = new DirectoryInfo(dir); d is not null; d = d.Parent)
                Assert.False(Directory.Exists(Path.Combine(d.FullName, "data", "tiny")), $"{d.FullName} holds data/tiny");
            var r = MoeloraProcess.RunIn(dir, "train", "--preset", "tiny", "-o", "runs/x", "--total-steps", "2", "--checkpoint-every", "0");
            Assert.True(r.ExitCode == 0, r.Stderr);
            Assert.Contains("48 circuit-breaker, 64 retain examples", r.Stdout);
            Assert.True(File.Exists(Path.Combine(dir, "runs", "x", "adapter_model.safetensors")));
            Assert.True(File.Exists(Path.Combine(dir, "runs", "x", "adapter_config.json")));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void Train_takes_target_lists_and_lora_config_folders_as_report_does()
    {
        var dir = Directory.CreateTempSubdirectory("moelora-lora-").FullName;
        try
        {
            File.WriteAllText(Path.Combine(dir, "adapter_config.json"), """{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}""");
            // Repeated -t and a comma list mean the same list, as in report.
            var r = MoeloraProcess.Run("train", "--preset", "tiny", "--plan-only", "--lora-config", dir, "-t", "q_proj", "-t", "v_proj,o_proj",
                "-o", Path.Combine(dir, "run"));
            Assert.True(r.ExitCode == 0, r.Stderr);
            var missing = MoeloraProcess.Run("train", "--preset", "tiny", "--plan-only", "--lora-config", Path.Combine(dir, "none"), "-o", Path.Combine(dir, "run"));
            MoeloraProcess.AssertCleanError(missing, 1, "--lora-config");
        }
        finally { Directory.Delete(dir, true); }
    }
}
