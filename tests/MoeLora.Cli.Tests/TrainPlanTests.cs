namespace MoeLora.Cli.Tests;

/// <summary>`moelora train` sizes a run with Core's memory model before loading anything, and refuses what cannot fit.</summary>
public class TrainPlanTests
{
    private static string Out() => Path.Combine(Directory.CreateTempSubdirectory().FullName, "run");

    [Fact]
    public void Tiny_plan_only_prints_the_memory_plan()
    {
        var r = MoeloraProcess.Run("train", "--preset", "tiny", "--plan-only", "--output", Out());
        Assert.Equal(0, r.ExitCode);
        Assert.Contains("memory plan", r.Stdout);
        Assert.Contains("fits", r.Stdout);
    }

    [Fact]
    public void Real_preset_plans_from_the_catalog_without_weights()
    {
        var r = MoeloraProcess.Run("train", "--preset", "qwen3-30b-a3b", "--plan-only", "--bf16", "--batch-size", "1",
            "--max-memory-gb", "1000", "--output", Out());
        Assert.Equal(0, r.ExitCode);
        Assert.Contains("Qwen/Qwen3-30B-A3B (config from the embedded catalog; no weights loaded)", r.Stdout);
        Assert.Contains("trainable (PEFT's count)", r.Stdout);
    }

    [Fact]
    public void A_run_that_cannot_fit_is_refused_in_one_line() =>
        MoeloraProcess.AssertCleanError(
            MoeloraProcess.Run("train", "--preset", "llama-3-8b", "--plan-only", "--max-memory-gb", "80", "--output", Out()),
            1, "would not fit");

    [Fact]
    public void Training_is_refused_before_loading_when_memory_is_too_small() =>
        MoeloraProcess.AssertCleanError(
            MoeloraProcess.Run("train", "--preset", "tiny", "--max-memory-gb", "0.01", "--output", Out()),
            1, "refusing to start");
}
