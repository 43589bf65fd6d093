using System.Text.Json.Nodes;

namespace MoeLora.Cli.Tests;

/// <summary><c>report --load-model --measure-steps</c> on the CPU: measured LoRA and circuit-breaker steps next to Core's prediction.</summary>
[Collection("cli")] // in-process runs share the static Consoles: one collection runs them one at a time
public sealed class StepMeasurementTests : IDisposable
{
    static string Model(string name) => Path.Combine(AppContext.BaseDirectory, "Data", "hf-tiny", name, "model");
    readonly string _tmp = Directory.CreateTempSubdirectory("moelora-steps-").FullName;
    public void Dispose() => Directory.Delete(_tmp, recursive: true);

    [Theory]
    [InlineData("qwen3_moe")]  // seed targets rewritten onto the fused experts
    [InlineData("mixtral")]    // seed targets on attention only
    public void Lora_and_cb_steps_are_measured_with_finite_losses_and_predictions(string model)
    {
        var json = Path.Combine(_tmp, "r.json");
        // 64 tokens: enough that the step's activations, not the optimizer update, are the predicted peak (with SDPA
        // attention no S × S scores inflate tiny steps), so the step terms checked below are listed.
        var (code, err) = InProcessCli.Run("report", Model(model), "--load-model", "--init", "random", "--measure-steps", "lora,cb",
            "--step-tokens", "64", "--step-repeats", "2", "--seq-length", "32", "--dtype", "fp32", "--format", "json", "-o", json);
        Assert.True(code == 0, err);
        var root = JsonNode.Parse(File.ReadAllText(json))!;
        var measured = root["measured"]!;
        var steps = measured["steps"]!.AsObject();
        Assert.Equal(["cb", "lora"], steps.Select(kv => kv.Key).Order());
        foreach (var (mode, node) in steps)
        {
            var step = node!;
            Assert.True(step["ok"]!.GetValue<bool>(), $"{mode}: {step["error"]}");
            foreach (var key in new[] { "step_s", "tokens_per_s", "loss", "peak_bytes", "predicted_bytes", "used_after_build_bytes" })
                Assert.True(step[key] is not null, $"{mode}: no {key}");
            Assert.True(double.IsFinite(step["loss"]!.GetValue<double>()), $"{mode}: loss {step["loss"]}");
            Assert.All(step["losses"]!.AsArray(), l => Assert.True(l is not null && double.IsFinite(l.GetValue<double>())));
            Assert.Equal(3, step["step_times_s"]!.AsArray().Count); // one warm-up + --step-repeats 2
            Assert.True(step["step_s"]!.GetValue<double>() > 0, $"{mode}: step_s {step["step_s"]}");
            // On the CPU the peak is the process's resident set, shared with the other in-process tests and reused from
            // freed heap: it can stay flat for a step this small, so only its presence and sign are checked here.
            Assert.True(step["peak_bytes"]!.GetValue<long>() >= 0, $"{mode}: peak_bytes {step["peak_bytes"]}");
            Assert.True(step["predicted_bytes"]!.GetValue<long>() > 0, $"{mode}: predicted_bytes {step["predicted_bytes"]}");
            // tokens per step: a cb step runs a retain and a CB batch.
            Assert.Equal(mode == "cb" ? 128 : 64, step["tokens_per_step"]!.GetValue<long>());
            // The runtime variant of the prediction: no materialised W+ΔW, and no expert LoRA products kept either (the
            // runtime recomputes the routed experts in backward).
            var terms = step["predicted_terms"]!.AsObject();
            Assert.False(terms.ContainsKey("fused_expert_lora_weights"));
            Assert.False(terms.ContainsKey("expert_lora_low_rank"));
        }
        // cb runs on the model truncated to max(target)+1 blocks; lora on the whole model.
        var targets = root["memory"]!["hidden_states"]!["target_layers"]!.AsArray().Select(x => x!.GetValue<int>()).ToList();
        Assert.Equal(targets.Max() + 1, steps["cb"]!["layers"]!.GetValue<long>());
        Assert.True(steps["cb"]!["layers"]!.GetValue<long>() < steps["lora"]!["layers"]!.GetValue<long>(), "cb should run fewer blocks than lora");
        // Predicted-vs-measured rows for both steps, and the section in the document.
        var rows = measured["rows"]!.AsArray().Select(r => r!["figure"]!.GetValue<string>()).ToList();
        Assert.Contains(rows, f => f.StartsWith("LoRA step peak", StringComparison.Ordinal));
        Assert.Contains(rows, f => f.StartsWith("circuit-breaker step peak", StringComparison.Ordinal));
        Assert.Contains(root["sections"]!.AsArray(), s => s!["id"]!.GetValue<string>() == "measured-steps");
    }

    [Fact]
    public void A_step_predicted_not_to_fit_is_not_run_and_the_report_completes()
    {
        var json = Path.Combine(_tmp, "r.json");
        // 1 kB free: below any step's prediction beyond the model already built.
        MoeLora.Cli.Commands.StepMeasurement.FreeBytesOverride = 1024;
        try
        {
            var (code, err) = InProcessCli.Run("report", Model("qwen3_moe"), "--load-model", "--init", "random", "--measure-steps", "lora,cb",
                "--step-tokens", "8", "--step-repeats", "1", "--seq-length", "4", "--dtype", "fp32", "--format", "json", "-o", json);
            Assert.True(code == 0, err);
        }
        finally { MoeLora.Cli.Commands.StepMeasurement.FreeBytesOverride = null; }
        var steps = JsonNode.Parse(File.ReadAllText(json))!["measured"]!["steps"]!.AsObject();
        foreach (var mode in new[] { "lora", "cb" })
        {
            Assert.False(steps[mode]!["ok"]!.GetValue<bool>());
            var error = steps[mode]!["error"]!.GetValue<string>();
            Assert.StartsWith("not run: Core predicts a peak of ", error);
            Assert.DoesNotContain('\n', error);
        }
    }

    [Fact]
    public void Markdown_shows_the_steps_table()
    {
        var md = Path.Combine(_tmp, "r.md");
        var (code, err) = InProcessCli.Run("report", Model("qwen3_moe"), "--load-model", "--init", "random", "--measure-steps", "lora",
            "--step-tokens", "8", "--step-repeats", "1", "--seq-length", "4", "--dtype", "fp32", "--format", "markdown", "-o", md);
        Assert.True(code == 0, err);
        var text = File.ReadAllText(md);
        Assert.Contains("Measured training steps", text);
        Assert.Contains("LoRA step", text);
        Assert.DoesNotContain("circuit-breaker", text[text.IndexOf("Measured training steps", StringComparison.Ordinal)..]);
    }

    [Fact]
    public void Bad_step_options_give_one_line_errors_before_any_work()
    {
        foreach (var (args, message) in new (string[], string)[]
        {
            (["--load-model", "--measure-steps", "sft"], "--measure-steps 'sft': 'sft' is not a step; use lora, cb or lora,cb"),
            (["--load-model", "--measure-steps", "lora,"], "--measure-steps 'lora,': '' is not a step"),
            (["--measure-steps", "lora"], "--measure-steps needs --load-model"),
            (["--load-model", "--measure-steps", "lora", "--step-tokens", "1"], "--step-tokens 1: must be at least 2"),
            (["--load-model", "--measure-steps", "cb", "--step-batch", "0"], "--step-batch 0: must be at least 1"),
            (["--load-model", "--measure-steps", "cb", "--step-repeats", "0"], "--step-repeats 0: must be at least 1"),
            (["--load-model", "--measure-steps", "cb", "--step-tokens", "many"], "--step-tokens"),
        })
        {
            // A model that does not exist: validation must refuse before it is looked up.
            var (code, _, err) = InProcessCli.RunCapturing(100, ["report", Path.Combine(_tmp, "no-such-model"), .. args]);
            Assert.True(code != 0, $"{string.Join(' ', args)}: exit {code}");
            Assert.Contains(message, err);
            Assert.Single(err.Trim().Split('\n'));
            Assert.DoesNotContain("   at ", err);
        }
    }
}
