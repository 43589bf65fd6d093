using System.Text.Json.Nodes;

namespace MoeLora.Cli.Tests;

/// <summary>
/// <c>--gradient-checkpointing</c> in the commands that train: <c>train</c> gives the run it gives without it (losses and
/// gradient norms step by step), and <c>report --measure-steps</c> measures the same losses against a prediction that
/// keeps checkpoints instead of every layer's activations.
/// </summary>
[Collection("cli")] // in-process runs share the static Consoles: one collection runs them one at a time
public sealed class GradientCheckpointingCliTests : IDisposable
{
    readonly string _tmp = Directory.CreateTempSubdirectory("moelora-ckpt-").FullName;
    public void Dispose() => Directory.Delete(_tmp, recursive: true);

    List<JsonNode> TrainMetrics(string name, params string[] more)
    {
        var output = Path.Combine(_tmp, name);
        var r = MoeloraProcess.Run(["train", "--output", output, "--total-steps", "4", "--checkpoint-every", "0", .. more]);
        Assert.True(r.ExitCode == 0, r.Stderr);
        return File.ReadLines(Path.Combine(output, "metrics.jsonl")).Select(l => JsonNode.Parse(l)!).ToList();
    }

    [Fact]
    public void Train_with_checkpointing_repeats_the_run_without_it()
    {
        var plain = TrainMetrics("plain");
        var ckpt = TrainMetrics("ckpt", "--gradient-checkpointing");
        Assert.Equal(4, ckpt.Count);
        foreach (var (a, b) in plain.Zip(ckpt))
            foreach (var key in new[] { "loss", "cb_loss", "retain_loss", "grad_norm" })
            {
                double x = a[key]!.GetValue<double>(), y = b[key]!.GetValue<double>();
                Assert.True(Math.Abs(x - y) <= 1e-4 * Math.Max(1, Math.Abs(x)), $"step {a["step"]} {key}: {x} vs {y}");
            }
    }

    [Fact]
    public void Measured_steps_with_checkpointing_give_the_same_losses_and_predict_less()
    {
        JsonNode Steps(params string[] more)
        {
            var json = Path.Combine(_tmp, $"r{more.Length}.json");
            var (code, err) = InProcessCli.Run(["report", Path.Combine(AppContext.BaseDirectory, "Data", "hf-tiny", "qwen3_moe", "model"),
                "--load-model", "--init", "random", "--measure-steps", "lora,cb", "--step-tokens", "64", "--step-repeats", "2",
                "--dtype", "fp32", "--format", "json", "-o", json, .. more]);
            Assert.True(code == 0, err);
            return JsonNode.Parse(File.ReadAllText(json))!["measured"]!["steps"]!;
        }
        var plain = Steps();
        var ckpt = Steps("--gradient-checkpointing");
        foreach (var mode in new[] { "lora", "cb" })
        {
            Assert.True(ckpt[mode]!["ok"]!.GetValue<bool>(), $"{mode}: {ckpt[mode]!["error"]}");
            var a = plain[mode]!["losses"]!.AsArray().Select(l => l!.GetValue<double>()).ToList();
            var b = ckpt[mode]!["losses"]!.AsArray().Select(l => l!.GetValue<double>()).ToList();
            Assert.Equal(a.Count, b.Count);
            Assert.All(a.Zip(b), p => Assert.True(Math.Abs(p.First - p.Second) <= 1e-4 * Math.Max(1, Math.Abs(p.First)), $"{mode}: {p.First} vs {p.Second}"));
            Assert.True(ckpt[mode]!["predicted_bytes"]!.GetValue<long>() <= plain[mode]!["predicted_bytes"]!.GetValue<long>(), mode);
        }
    }
}
