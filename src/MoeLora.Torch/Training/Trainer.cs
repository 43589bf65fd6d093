using System.Text.Json;
using System.Text.Json.Nodes;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using TorchSharp;
using static TorchSharp.torch;
using MoeLora.Core;

namespace MoeLora.Torch.Training;

/// <summary>Supplies micro-batch number <c>index</c> (0-based over the whole run) deterministically.</summary>
public interface ICbBatchSource
{
    (TokenBatch Cb, TokenBatch Retain) Get(long index);
}

public sealed record TrainOptions
{
    /// <summary>hidden_states indices of the rerouting loss (HF indexing: 0 = embeddings).</summary>
    public required IReadOnlyList<int> TargetLayers { get; init; }
    public double Alpha { get; init; } = 5.0;
    public string LossWeighting { get; init; } = "dual";
    public int TotalSteps { get; init; } = 150;
    public double LearningRate { get; init; } = 1e-4;
    public string LrSchedule { get; init; } = "constant";
    public int WarmupSteps { get; init; }
    public double WeightDecay { get; init; }
    public double MaxGradNorm { get; init; } = 1.0;
    public int GradientAccumulation { get; init; } = 1;
    public long Seed { get; init; } = 42;
    /// <summary>Save a checkpoint every N optimizer steps (0: only at the end, on Ctrl-C and on divergence).</summary>
    public int CheckpointEvery { get; init; } = 50;
    public required string OutputDir { get; init; }
    /// <summary>Settings a resume must not change, stored in every checkpoint (see <see cref="CheckpointState.Settings"/>).</summary>
    public JsonObject? Settings { get; init; }
}

/// <summary>What one optimizer step did (the values also written to metrics.jsonl).</summary>
public sealed record StepMetrics(int Step, int TotalSteps, double Loss, double RetainLoss, double CbLoss, double RetainCoeff,
    double CbCoeff, double CbCosine, double GradNorm, double LearningRate, double Seconds)
{
    public JsonObject ToJson() => new()
    {
        ["step"] = Step, ["loss"] = Loss, ["retain_loss"] = RetainLoss, ["cb_loss"] = CbLoss,
        ["retain_coeff"] = RetainCoeff, ["cb_coeff"] = CbCoeff, ["cb_cosine"] = double.IsNaN(CbCosine) ? null : CbCosine,
        ["grad_norm"] = double.IsFinite(GradNorm) ? GradNorm : null, ["lr"] = LearningRate, ["seconds"] = Math.Round(Seconds, 4),
    };
}

public enum TrainOutcome { Completed, Interrupted }

/// <summary>
/// Training stopped because a loss or gradient was NaN/inf. The last good state was saved as a checkpoint; the user
/// acts on it (lower --lr, clipping, float32), so it is reported as input to fix (exit 1), not as a bug.
/// </summary>
public sealed class TrainingDivergedException(string message) : UserInputException(message);

/// <summary>
/// Circuit-breaker LoRA training: per optimizer step, <see cref="TrainOptions.GradientAccumulation"/> micro-batches of
/// <see cref="CircuitBreakerLoss.Compute"/> (loss divided by the accumulation count, as HF Trainer), gradient clipping,
/// AdamW. Deterministic on CPU given the seed: data order depends only on the micro-batch index, and the checkpoint
/// holds adapter weights, optimizer moments, the torch RNG state and the step, so a resumed run equals an uninterrupted one.
/// </summary>
public sealed class CircuitBreakerTrainer
{
    readonly CausalLm _model;
    readonly InjectedAdapter _adapter;
    readonly ICbBatchSource _data;
    readonly TrainOptions _o;
    readonly CoefficientSchedule _coeffs;
    readonly LrSchedule _lr;
    readonly AdamW _optimizer;
    public int Step { get; private set; }
    public string CheckpointDir => Path.Combine(_o.OutputDir, "checkpoint");
    public string MetricsPath => Path.Combine(_o.OutputDir, "metrics.jsonl");
    /// <summary>Optional extra trainable tensors (e.g. router weights with --train-router), saved in the checkpoint.</summary>
    public IReadOnlyList<(string Name, Parameter Param)> ExtraParameters { get; }

    public CircuitBreakerTrainer(CausalLm model, InjectedAdapter adapter, ICbBatchSource data, TrainOptions options,
        IReadOnlyList<(string Name, Parameter Param)>? extraParameters = null)
    {
        _model = model; _adapter = adapter; _data = data; _o = options;
        if (options.GradientAccumulation < 1) throw new UserInputException("--gradient-accumulation must be at least 1.");
        if (options.TargetLayers.Count == 0) throw new UserInputException("--cb-target-layers is empty.");
        foreach (var l in options.TargetLayers)
            if (l < 0 || l > model.NumLayers)
                throw new UserInputException($"--cb-target-layers: {l} is not a hidden_states index of this model (0..{model.NumLayers}).");
        _coeffs = CoefficientSchedule.Create(options.LossWeighting, options.Alpha, options.TotalSteps);
        _lr = Training.LrSchedule.Create(options.LrSchedule, options.LearningRate, options.TotalSteps, options.WarmupSteps);
        ExtraParameters = extraParameters ?? [];
        var trainable = LoraInjector.PeftNamedParameters(model).Where(p => IsAdapterParam(p.Name)).ToList();
        trainable.AddRange(ExtraParameters);
        _optimizer = new AdamW(trainable, weightDecay: options.WeightDecay);
        Directory.CreateDirectory(options.OutputDir);
    }

    static bool IsAdapterParam(string name) => name.Contains(".lora_A.", StringComparison.Ordinal) || name.Contains(".lora_B.", StringComparison.Ordinal)
        || name.Contains(".lora_magnitude_vector.", StringComparison.Ordinal);

    /// <summary>Starts a run: seeds torch's RNG (dropout) and clears metrics.jsonl.</summary>
    public void Start()
    {
        torch.manual_seed(_o.Seed);
        Step = 0;
        File.WriteAllText(MetricsPath, "");
    }

    /// <summary>Continues from <see cref="CheckpointDir"/> (or the given directory); metrics.jsonl is cut back to that step.</summary>
    public void Resume(string? checkpointDir = null)
    {
        var dir = Checkpoints.Find(checkpointDir ?? CheckpointDir)
            ?? throw new IOException($"no checkpoint to resume from in {checkpointDir ?? CheckpointDir}.");
        var state = Checkpoints.Load(dir, _model, _optimizer, ExtraParameters);
        if (state.TotalSteps != _o.TotalSteps || state.Seed != _o.Seed)
            throw new UserInputException($"the checkpoint in {dir} was written with --total-steps {state.TotalSteps} --seed {state.Seed}; resume with the same settings.");
        Step = state.Step;
        if (File.Exists(MetricsPath))
        {
            var keep = File.ReadAllLines(MetricsPath).Where(l => l.Length > 0 && MetricsStep(l) is { } s && s <= Step);
            File.WriteAllLines(MetricsPath, keep);
        }
    }

    // A line of metrics.jsonl that is not one this trainer wrote (a torn last line after a kill) is dropped.
    static int? MetricsStep(string line)
    {
        try { return JsonNode.Parse(line)?["step"] is JsonValue v && v.TryGetValue(out int step) ? step : null; }
        catch (JsonException) { return null; }
    }

    /// <summary>Runs optimizer steps until TotalSteps (or Ctrl-C: the current step finishes and a checkpoint is saved).</summary>
    public TrainOutcome Run(Action<StepMetrics>? onStep = null, CancellationToken cancel = default, int? stopAfterStep = null)
    {
        var sw = new System.Diagnostics.Stopwatch();
        while (Step < _o.TotalSteps)
        {
            if (cancel.IsCancellationRequested) { SaveCheckpoint(); return TrainOutcome.Interrupted; }
            sw.Restart();
            int step = Step + 1;
            var rngBefore = torch.get_rng_state();
            var (rc, cc) = _coeffs.At(step);
            double lr = _lr.At(Step);
            _optimizer.ZeroGrad();
            int accum = _o.GradientAccumulation;
            // The micro-batches' [retain, reroute, cosine] summed on the device, and read together with the gradient
            // norm: one wait for the device per step, where the divergence check needs both.
            double retain, cb, cos, gradNorm;
            using (NewDisposeScope())
            {
                var parts = zeros(3, ScalarType.Float32, _model.Device);
                for (int micro = 0; micro < accum; micro++)
                {
                    using var scope = NewDisposeScope();
                    var (cbBatch, retainBatch) = _data.Get((long)Step * accum + micro);
                    var r = CircuitBreakerLoss.Compute(_model, cbBatch, retainBatch, _o.TargetLayers, rc, cc);
                    (r.Total / accum).backward();
                    Nn.BackwardHandles.Release();
                    parts.add_(r.Parts / accum);
                }
                var norm = GradClip.ClipGradNorm(_optimizer.Parameters.Select(p => p.Param), _o.MaxGradNorm);
                var values = cat([parts, norm.to(_model.Device).reshape(1)]).cpu().data<float>().ToArray();
                (retain, cb, cos, gradNorm) = (values[0], values[1], values[2], values[3]);
            }
            double loss = new CbLossValues(retain, cb, cos, rc, cc).TotalValue;
            if (!double.IsFinite(loss) || !double.IsFinite(gradNorm))
            {
                // Parameters and optimizer are still at the end of the previous step: save that state as the checkpoint.
                torch.set_rng_state(rngBefore);
                _optimizer.ZeroGrad();
                SaveCheckpoint();
                throw new TrainingDivergedException(
                    $"step {step}: {(double.IsFinite(loss) ? "gradient norm" : "loss")} is {(double.IsFinite(loss) ? gradNorm : loss)}; training stopped. " +
                    $"The last good state (step {Step}) is saved in {CheckpointDir}; lower --lr, enable clipping or use float32.");
            }
            rngBefore.Dispose();
            _optimizer.Step(lr);
            Step = step;
            var m = new StepMetrics(step, _o.TotalSteps, loss, retain, cb, rc, cc, cc > 0 ? cos : double.NaN, gradNorm, lr, sw.Elapsed.TotalSeconds);
            File.AppendAllText(MetricsPath, m.ToJson().ToJsonString() + "\n");
            onStep?.Invoke(m);
            if ((_o.CheckpointEvery > 0 && step % _o.CheckpointEvery == 0) || step == _o.TotalSteps) SaveCheckpoint();
            if (stopAfterStep is { } stop && step >= stop && step < _o.TotalSteps) { SaveCheckpoint(); return TrainOutcome.Interrupted; }
        }
        return TrainOutcome.Completed;
    }

    public void SaveCheckpoint() =>
        Checkpoints.Save(CheckpointDir, _model, _adapter, _optimizer, ExtraParameters,
            new CheckpointState(Step, _o.TotalSteps, _o.Seed, _optimizer.StepCount, _o.Settings));

    /// <summary>Writes the trained adapter in PEFT's format (adapter_config.json + adapter_model.safetensors) atomically.</summary>
    public void SaveAdapter(string dir) => Checkpoints.SaveAdapterAtomically(dir, _model, _adapter, ExtraParameters);
}
