using MoeLora.Torch.IO;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Training;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests.Training;

[Collection(TorchGlobalRng.Name)]
public class TrainerTests(ITestOutputHelper log)
{
    [Fact]
    public void TinyRunReroutesCbAndKeepsRetainSmall()
    {
        using var dir = new TempDir();
        using var run = new TinyRun(dir.Path, totalSteps: 30, batchSize: 2, lr: 2e-3);
        run.Trainer.Start();
        var metrics = new List<StepMetrics>();
        var sw = System.Diagnostics.Stopwatch.StartNew();
        run.Trainer.Run(metrics.Add);
        foreach (var m in metrics) log.WriteLine($"{m.Step} loss {m.Loss:F4} retain {m.RetainLoss:F4} cb {m.CbLoss:F4} cos {m.CbCosine:F4} gn {m.GradNorm:E2} ({m.Seconds:F2}s)");
        log.WriteLine($"total {sw.Elapsed.TotalSeconds:F1}s");
        Assert.True(metrics[^1].CbCosine < 0.5 * metrics[0].CbCosine, $"cosine {metrics[0].CbCosine} -> {metrics[^1].CbCosine}");
        Assert.True(metrics[1].GradNorm > 0, "gradients stay zero after the first step (the zero-gradient start never escaped)");
        // Held-out metrics: rerouted on CB examples, retain hidden states within 35% of their norm.
        var loader = new CbDataLoader(CbModels.Tokenizer(null), ChatTemplate.Get("llama3"), run.Preset.Lengths);
        var eval = CbEvaluator.Evaluate(run.Model, loader.LoadCircuitBreaker(Path.Combine(TinyRun.DataDir, "cb_eval.jsonl")),
            loader.LoadRetain(Path.Combine(TinyRun.DataDir, "retain_eval.jsonl")), run.Preset.TargetLayers, 4, withAdapter: true);
        log.WriteLine($"eval: cos {eval.CbCosine:F4} retain {eval.RetainDistance:F4} rel {eval.RetainRelativeDistance:F4}");
        Assert.True(eval.CbCosine < 0.5, $"held-out CB cosine {eval.CbCosine}");
        Assert.True(eval.RetainRelativeDistance < 0.35, $"held-out retain relative distance {eval.RetainRelativeDistance}");
    }
}

[Collection(TorchGlobalRng.Name)]
public class ResumeTests(ITestOutputHelper log)
{
    static byte[] AdapterBytes(string dir) => File.ReadAllBytes(Path.Combine(dir, "adapter_model.safetensors"));

    [Fact]
    public void ResumeEqualsUninterruptedRunBitForBit()
    {
        using var a = new TempDir();
        using var b = new TempDir();
        const int steps = 4;
        using (var run = new TinyRun(a.Path, steps, batchSize: 2, accumulation: 2))
        {
            run.Trainer.Start();
            run.Trainer.Run();
            run.Trainer.SaveAdapter(Path.Combine(a.Path, "adapter"));
        }
        using (var run = new TinyRun(b.Path, steps, batchSize: 2, accumulation: 2))
        {
            run.Trainer.Start();
            Assert.Equal(TrainOutcome.Interrupted, run.Trainer.Run(stopAfterStep: 2));
        }
        using (var run = new TinyRun(b.Path, steps, batchSize: 2, accumulation: 2)) // a fresh process-like start
        {
            run.Trainer.Resume();
            Assert.Equal(2, run.Trainer.Step);
            run.Trainer.Run();
            run.Trainer.SaveAdapter(Path.Combine(b.Path, "adapter"));
        }
        Assert.Equal(AdapterBytes(Path.Combine(a.Path, "adapter")), AdapterBytes(Path.Combine(b.Path, "adapter")));
        Assert.Equal(File.ReadAllBytes(Path.Combine(a.Path, "checkpoint", "trainer_state.safetensors")),
            File.ReadAllBytes(Path.Combine(b.Path, "checkpoint", "trainer_state.safetensors")));
        var la = File.ReadAllLines(Path.Combine(a.Path, "metrics.jsonl")).Select(StripTime).ToList();
        var lb = File.ReadAllLines(Path.Combine(b.Path, "metrics.jsonl")).Select(StripTime).ToList();
        Assert.Equal(la, lb);
        log.WriteLine(string.Join("\n", la));
    }

    static string StripTime(string line) => System.Text.RegularExpressions.Regex.Replace(line, "\"seconds\":[^,}]+", "");

    [Fact]
    public void CancelledRunLeavesALoadableCheckpointAndAdapterReloadsToSameHiddenStates()
    {
        using var dir = new TempDir();
        using var cts = new CancellationTokenSource();
        using var run = new TinyRun(dir.Path, totalSteps: 50, batchSize: 2);
        run.Trainer.Start();
        var outcome = run.Trainer.Run(m => { if (m.Step == 2) cts.Cancel(); }, cts.Token);
        Assert.Equal(TrainOutcome.Interrupted, outcome);
        var ckpt = Path.Combine(dir.Path, "checkpoint");
        Assert.Contains("\"step\": 2", File.ReadAllText(Path.Combine(ckpt, "trainer_state.json")));
        Assert.False(Directory.EnumerateDirectories(dir.Path).Any(d => d.Contains(".tmp-")), "temporary directory left behind");

        // The checkpoint's adapter is a PEFT adapter: a fresh base model + LoadPeftAdapter gives the same hidden states.
        var (cbBatch, _) = run.Data.Get(0);
        run.Model.Eval();
        using var expected = run.Model.Forward(cbBatch.InputIds, cbBatch.AttentionMask, outputHiddenStates: true);
        using var fresh = CbModels.Load(null, run.Model.NumLayers, ScalarType.Float32, CPU);
        LoraInjector.LoadPeftAdapter(fresh, ckpt);
        fresh.Eval();
        using var actual = fresh.Forward(cbBatch.InputIds, cbBatch.AttentionMask, outputHiddenStates: true);
        for (int i = 0; i < expected.HiddenStates.Count; i++)
            Assert.True(expected.HiddenStates[i].equal(actual.HiddenStates[i]).all().item<bool>(), $"hidden_states[{i}] differs after reload by {(expected.HiddenStates[i] - actual.HiddenStates[i]).abs().max().item<float>()}");
        using var baseOut = CbModels.Load(null, run.Model.NumLayers, ScalarType.Float32, CPU)
            .Forward(cbBatch.InputIds, cbBatch.AttentionMask, outputHiddenStates: true);
        Assert.False(baseOut.HiddenStates[^1].equal(actual.HiddenStates[^1]).all().item<bool>(), "the trained adapter changed nothing");
    }

    [Fact]
    public void NanStopsWithAClearMessageAndKeepsTheLastGoodCheckpoint()
    {
        using var dir = new TempDir();
        using var run = new TinyRun(dir.Path, totalSteps: 10, batchSize: 2);
        run.Trainer.Start();
        run.Trainer.Run(stopAfterStep: 2);
        // Poison one adapter weight: the next loss is NaN.
        var (_, p) = LoraInjector.PeftNamedParameters(run.Model).First(x => x.Name.Contains("lora_A"));
        var saved = p.detach().clone();
        using (no_grad()) p.fill_(double.NaN);
        var ex = Assert.Throws<TrainingDivergedException>(() => run.Trainer.Run());
        Assert.Contains("step 3", ex.Message);
        Assert.Contains("last good state (step 2)", ex.Message);
        log.WriteLine(ex.Message);
        Assert.Contains("\"step\": 2", File.ReadAllText(Path.Combine(dir.Path, "checkpoint", "trainer_state.json")));
    }
}
