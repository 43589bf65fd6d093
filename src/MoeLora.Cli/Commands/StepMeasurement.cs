using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Rendering.Document;
using MoeLora.Core;
using MoeLora.Core.Analysis;
using MoeLora.Core.Memory;
using MoeLora.Core.Peft;
using MoeLora.Sources;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Training;
using static TorchSharp.torch;

namespace MoeLora.Cli.Commands;

/// <summary>
/// Memory this process takes on a device from a baseline read before any model is built.
/// <para>CUDA: libtorch's caching allocator keeps every block it ever reserved (nothing here calls
/// <c>empty_cache</c>, and TorchSharp 0.107 has none), so the device's used memory after a step minus the reading
/// before the model was built is the peak this process reserved in between (cudaMemGetInfo; the CUDA context is
/// created before the baseline so it is not counted). It is the largest of everything since the baseline, so the
/// steps are measured in an order where each later phase is expected to be the larger (see <see cref="Order"/>).</para>
/// <para>CPU: the peak resident set (VmHWM, reset at the start of each step where Linux allows) minus the resident set
/// at the baseline.</para>
/// </summary>
internal sealed class DevicePeakMeter
{
    public Device Device { get; }
    public long BaselineBytes { get; }
    public bool IsCuda => Device.type == TorchSharp.DeviceType.CUDA;

    DevicePeakMeter(Device device, long baseline) { Device = device; BaselineBytes = baseline; }

    public static DevicePeakMeter Start(Device device)
    {
        if (device.type == TorchSharp.DeviceType.CUDA)
        {
            using (zeros(1, device: device)) { } // creates the CUDA context (and maps libcudart) before the baseline
            cuda.synchronize(device);
        }
        else
        {
            // Managed garbage freed later would lower the resident set below the baseline: collect it first.
            StepMeasurement.CollectGarbage();
        }
        return new DevicePeakMeter(device, DeviceMemory.Used(device));
    }

    /// <summary>Bytes in use above the baseline now (after a build: the weights and adapters, plus allocator rounding).</summary>
    public long UsedAboveBaseline()
    {
        if (IsCuda) cuda.synchronize(Device);
        return DeviceMemory.Used(Device) - BaselineBytes;
    }

    /// <summary>Starts a step window (CPU: VmHWM back to the current resident set).</summary>
    public void StartWindow()
    {
        if (IsCuda) return;
        DeviceMemory.ResetPeakHost();
        _windowStart = DeviceMemory.Used(Device);
    }

    long? _windowStart;

    /// <summary>The peak above the baseline since <see cref="StartWindow"/> (CUDA: since the baseline, see the class note).</summary>
    public long PeakAboveBaseline()
    {
        if (IsCuda) { cuda.synchronize(Device); return DeviceMemory.Used(Device) - BaselineBytes; }
        // Garbage collected since the baseline (an earlier step's, or another in-process caller's) can leave the
        // resident set below it: measure from whichever is lower.
        return Math.Max(0, Measurements.ProcessPeakBytes() - Math.Min(BaselineBytes, _windowStart ?? BaselineBytes));
    }

    public string Source => IsCuda
        ? "device memory in use after the steps − before the model was built (cudaMemGetInfo): what libtorch's caching allocator reserved, never returned"
        : "peak resident set during the steps (VmHWM) − resident set before the model was built";

    /// <summary>
    /// cb first (on its own truncated model, then freed), lora second on the whole model: with a caching allocator
    /// that never shrinks, the later reading would include the earlier peak, and the whole model's weights alone
    /// exceed the truncated model's.
    /// </summary>
    public static IReadOnlyList<string> Order(IReadOnlyList<string> modes) => [.. new[] { "cb", "lora" }.Where(modes.Contains)];
}

/// <summary>One measured training step mode: timings, losses, peak memory and Core's prediction for it.</summary>
internal sealed class MeasuredStep
{
    public required string Mode { get; init; }
    public required int Batch { get; init; }
    public required int Tokens { get; init; }
    public required long Layers { get; init; }
    public required TrainingMemory Prediction { get; init; }
    public required string PeakSource { get; init; }
    public StepRun? Run { get; set; }
    public long PeakBytes { get; set; }
    public long UsedAfterBuildBytes { get; set; }
    /// <summary>Set when the step failed (e.g. out of device memory); the other figures are then partial.</summary>
    public string? Error { get; set; }
    public string? Note { get; set; }

    public long PredictedBytes => Prediction.PerGpuBytes;

    /// <summary>The same step predicted for PyTorch + PEFT (ParamWrapper's W+ΔW, sdpa), for context.</summary>
    public required TrainingMemory PeftPrediction { get; init; }
    public double Ratio => PredictedBytes == 0 ? 0 : (double)PeakBytes / PredictedBytes;

    public string Title => Mode == "lora" ? "LoRA step" : "circuit-breaker step";

    /// <summary>
    /// Core's per-GPU step prediction for MoeLora's runtime (grouped low-rank expert LoRA, SDPA attention) with the
    /// measured step's batch, tokens and dtype; cb as the trainer runs it (truncated to max(target)+1 blocks).
    /// </summary>
    /// <param name="cuda">false on the CPU: no cuBLAS handles, so no workspaces.</param>
    /// <param name="checkpointing">--gradient-checkpointing: each layer recomputed in backward (both runtimes).</param>
    public static TrainingMemory Predict(LoraReport r, string mode, int batch, int tokens, bool cuda, bool checkpointing, LoraRuntime runtime = LoraRuntime.MoeLora) =>
        TrainingMemory.Estimate(r.Plan, new TrainingSetup
        {
            Mode = mode == "lora" ? TrainingMode.Lora : TrainingMode.CircuitBreaker,
            BatchSize = batch,
            SeqLength = tokens,
            DType = r.Options.DType,
            TargetLayers = r.HiddenStates.TargetLayers,
            CbFullLayers = false,
            GradientCheckpointing = checkpointing,
            Runtime = runtime,
            // MoeLora's runtime runs SDPA unless MOELORA_ATTN_IMPLEMENTATION=eager; transformers 5 picks sdpa for PEFT's
            // step (Core prices the layers either runtime runs eagerly, e.g. gpt-oss's sinks, as eager).
            Attention = runtime == LoraRuntime.MoeLora ? TrainMemoryPlan.RuntimeAttention() : AttentionImpl.Sdpa,
            GpuMemoryBytes = long.MaxValue / 4,
            CublasWorkspaceBytes = cuda ? new TrainingSetup().CublasWorkspaceBytes : 0,
        }, withFixes: false);

    public JsonObject ToJson() => new()
    {
        ["ok"] = Error is null,
        ["error"] = Error,
        ["layers"] = Layers,
        ["batch"] = Batch,
        ["tokens"] = Tokens,
        ["tokens_per_step"] = Run?.TokensPerStep,
        ["repeats"] = Run is null ? null : Run.Seconds.Count - 1,
        ["step_s"] = Run?.MedianSeconds,
        ["tokens_per_s"] = Run?.TokensPerSecond,
        ["loss"] = Run is null || !double.IsFinite(Run.Loss) ? null : Run.Loss,
        ["step_times_s"] = Run is null ? null : new JsonArray(Run.Seconds.Select(x => (JsonNode)JsonValue.Create(x)).ToArray()),
        ["losses"] = Run is null ? null : new JsonArray(Run.Losses.Select(x => (JsonNode?)(double.IsFinite(x) ? JsonValue.Create(x) : null)).ToArray()),
        ["peak_bytes"] = PeakBytes,
        ["predicted_bytes"] = PredictedBytes,
        ["measured_over_predicted"] = Math.Round(Ratio, 4),
        ["used_after_build_bytes"] = UsedAfterBuildBytes,
        ["peak_source"] = PeakSource,
        ["predicted_phase"] = Prediction.Phase,
        ["predicted_peft_bytes"] = PeftPrediction.PerGpuBytes,
        ["predicted_terms"] = new JsonObject(Prediction.Terms.Select(t => KeyValuePair.Create(t.Name, (JsonNode?)JsonValue.Create(t.Bytes)))),
        ["note"] = Note,
    };
}

/// <summary>Runs <c>--measure-steps</c> for <c>report --load-model</c>.</summary>
internal static class StepMeasurement
{
    /// <summary>
    /// The circuit-breaker step on its own model truncated to max(target)+1 blocks, built the way the trainer builds it
    /// (<see cref="CbModels"/>: config truncation, or the checkpoint's first blocks), freed before the whole model is built.
    /// </summary>
    public static MeasuredStep CircuitBreaker(LoraReport r, ResolvedModel resolved, string? dir, bool random, ScalarType dtype, Device dev,
        long seed, ReportCommand.Settings s, DevicePeakMeter meter)
    {
        var targets = r.HiddenStates.TargetLayers;
        int layers = CbModels.TruncatedLayers(targets, (int)r.Spec.NumHiddenLayers, fullLayers: false);
        var step = new MeasuredStep
        {
            Mode = "cb", Batch = s.StepBatch, Tokens = s.StepTokens, Layers = layers,
            Prediction = MeasuredStep.Predict(r, "cb", s.StepBatch, s.StepTokens, meter.IsCuda, s.GradientCheckpointing), PeakSource = meter.Source,
            PeftPrediction = MeasuredStep.Predict(r, "cb", s.StepBatch, s.StepTokens, meter.IsCuda, s.GradientCheckpointing, LoraRuntime.Peft),
            Note = $"on the model truncated to blocks 0..{layers - 1} (max target {targets.Max()} + 1), built for this step as the trainer does (a loaded model is not cut in place), then freed",
        };
        if (!Fits(step, meter, alreadyHeld: 0) || !CheckpointingAllowed(step, r, s)) return step;
        CausalLm? model = null;
        try
        {
            model = random
                ? TorchModelFactory.Random(TorchModelFactory.TruncateConfig(resolved.ConfigJson, layers), seed, dtype, dev, RandomInit.OnDevice)
                : RuntimeDevice.Load($"loading blocks 0..{layers - 1} of {r.Options.ModelId}", p => TorchModelFactory.LoadTruncated(dir!, layers, dtype, dev, p));
            var plan = AdapterPlanner.Plan(model.Spec, r.Plan.Requested, r.Plan.Version);
            LoraInjector.Inject(model, plan, seed: seed);
            model.GradientCheckpointing = s.GradientCheckpointing;
            step.UsedAfterBuildBytes = meter.UsedAboveBaseline();
            meter.StartWindow();
            Guard(step, () => step.Run = TrainingStep.CircuitBreaker(model, targets, s.StepBatch, s.StepTokens, s.StepRepeats, seed));
            step.PeakBytes = meter.PeakAboveBaseline();
        }
        finally
        {
            model?.Dispose();
            // The optimizer's moments and the last graph go with the managed objects that hold them: collect now so
            // the whole model the report builds next does not share the device with them.
            CollectGarbage();
        }
        return step;
    }

    /// <summary>The LoRA step on the whole (already adapted) model.</summary>
    public static MeasuredStep Lora(LoraReport r, CausalLm model, long seed, ReportCommand.Settings s, DevicePeakMeter meter, long usedAfterBuild)
    {
        var step = new MeasuredStep
        {
            Mode = "lora", Batch = s.StepBatch, Tokens = s.StepTokens, Layers = model.NumLayers,
            Prediction = MeasuredStep.Predict(r, "lora", s.StepBatch, s.StepTokens, meter.IsCuda, s.GradientCheckpointing), PeakSource = meter.Source,
            PeftPrediction = MeasuredStep.Predict(r, "lora", s.StepBatch, s.StepTokens, meter.IsCuda, s.GradientCheckpointing, LoraRuntime.Peft),
            UsedAfterBuildBytes = usedAfterBuild,
        };
        if (!Fits(step, meter, alreadyHeld: usedAfterBuild) || !CheckpointingAllowed(step, r, s)) return step;
        meter.StartWindow();
        model.GradientCheckpointing = s.GradientCheckpointing;
        try { Guard(step, () => step.Run = TrainingStep.Lora(model, s.StepBatch, s.StepTokens, s.StepRepeats, seed)); }
        finally { model.GradientCheckpointing = false; }
        step.PeakBytes = meter.PeakAboveBaseline();
        return step;
    }

    /// <summary>
    /// With --gradient-checkpointing the runtime recomputes each layer in backward, which would draw new LoRA dropout
    /// masks: a step with dropout is reported as not run.
    /// </summary>
    static bool CheckpointingAllowed(MeasuredStep step, LoraReport r, ReportCommand.Settings s)
    {
        if (!s.GradientCheckpointing || r.Plan.Effective.LoraDropout == 0) return true;
        step.Error = $"not run: --gradient-checkpointing needs lora_dropout 0 (this config's is {r.Plan.Effective.LoraDropout}; a recomputed layer would draw new dropout masks)";
        return false;
    }

    /// <summary>Tests may pretend the device has this many bytes free when a step is about to run.</summary>
    internal static long? FreeBytesOverride { get; set; }

    /// <summary>
    /// Runs a step only where Core's prediction fits what the device has left: the free memory plus what this process's
    /// allocator already holds beyond <paramref name="alreadyHeld"/> (the model's own bytes, part of the prediction).
    /// Trying is no way to find out: with a CUDA libtorch from an installed PyTorch, an out-of-memory error inside libtorch
    /// is not caught by TorchSharp's native layer and ends the process (seen on an H100 with Qwen3-30B-A3B), losing the
    /// whole report. The refusal is the step's result, with the figures that decided it.
    /// </summary>
    static bool Fits(MeasuredStep step, DevicePeakMeter meter, long alreadyHeld)
    {
        long free = FreeBytesOverride ?? (meter.IsCuda ? DeviceMemory.Free(meter.Device) : DeviceMemory.Host()).Bytes;
        // On CUDA, blocks libtorch's caching allocator holds beyond the model are free to this process but not counted as
        // free by cudaMemGetInfo. On the CPU the resident set's growth is no such reserve (other work in the process).
        long cached = meter.IsCuda ? Math.Max(0, meter.UsedAboveBaseline() - alreadyHeld) : 0;
        long need = step.PredictedBytes - alreadyHeld;
        if (need <= free + cached) return true;
        step.Error = $"not run: Core predicts a peak of {Units.Bytes(step.PredictedBytes)} ({Units.Bytes(need)} beyond the " +
            $"{Units.Bytes(alreadyHeld)} already built) but {meter.Device} has {Units.Bytes(free + cached)} left";
        return false;
    }

    /// <summary>An out-of-memory step is a result (it did not fit), recorded rather than ending the report.</summary>
    static void Guard(MeasuredStep step, Action run)
    {
        try { run(); }
        catch (Exception e) when (OutOfMemory.Is(e))
        {
            step.Error = "out of memory: " + OutOfMemory.Summary(e);
            // The failed step's activations and graph are only reachable from finalizers now: free them before the
            // report goes on to build and run the whole model.
            CollectGarbage();
        }
    }

    /// <summary>
    /// Frees tensors only finalizers still reach (TorchSharp releases native memory when a tensor is disposed or
    /// finalized): two collect-and-finalize rounds, since finalizing one object can release the last reference to another.
    /// </summary>
    internal static void CollectGarbage()
    {
        for (int i = 0; i < 2; i++) { GC.Collect(); GC.WaitForPendingFinalizers(); }
    }

    /// <summary>Predicted-vs-measured rows (figure, predicted, measured, note) for the report's main table.</summary>
    public static IEnumerable<(string, string, string, string)> Rows(IEnumerable<MeasuredStep> steps, bool cuda) =>
        steps.Select(m => ($"{m.Title} peak ({m.Batch} × {m.Tokens} tokens, {m.Layers} blocks)", Units.Bytes(m.PredictedBytes),
            m.Error is null ? Units.Bytes(m.PeakBytes) : "failed",
            m.Error ?? $"{m.Ratio:0.00}x of predicted " +
                (cuda ? $"({(Math.Abs(m.Ratio - 1) <= 0.10 ? "within" : "outside")} 10%)" : "(CPU process peak: runtime overheads dominate small models; the 10% goal is for a GPU)") +
                $"; MoeLora runtime, peak at {m.Prediction.Phase}"));

    /// <summary>The steps section: speed, loss and memory per mode.</summary>
    public static Section Section(IReadOnlyList<MeasuredStep> steps, bool cuda)
    {
        var rows = steps.Select(m => (IReadOnlyList<Text>)
        [
            m.Title, Units.Count(m.Layers),
            m.Run is null ? "-" : $"{m.Run.MedianSeconds:0.000}",
            m.Run is null ? "-" : $"{m.Run.TokensPerSecond:0}",
            m.Run is null || !double.IsFinite(m.Run.Loss) ? new Text(m.Run is null ? "-" : "not finite", Tone.Bad) : $"{m.Run.Loss:0.0000}",
            Units.Bytes(m.UsedAfterBuildBytes),
            m.Error is null ? Units.Bytes(m.PeakBytes) : new Text("failed", Tone.Bad),
            Units.Bytes(m.PredictedBytes),
            m.Error is null ? new Text($"{m.Ratio:0.00}x", !cuda || Math.Abs(m.Ratio - 1) <= 0.10 ? Tone.Plain : Tone.Bad) : new Text(m.Error, Tone.Bad),
            Units.Bytes(m.PeftPrediction.PerGpuBytes),
        ]).ToList();
        var first = steps[0];
        var blocks = new List<Block>
        {
            new Table([new("step"), new("blocks", Right: true), new("step s (median)", Right: true), new("tokens/s", Right: true), new("loss", Right: true),
                new("after build", Right: true), new("peak", Right: true), new("predicted", Right: true), new("measured / predicted", Right: true),
                new("PEFT predicted", Right: true)], rows),
            new Paragraph($"One warm-up step, then {(first.Run?.Seconds.Count ?? 1) - 1} timed steps on random token ids (seeded), batch {first.Batch} × {first.Tokens} tokens" +
                string.Concat(steps.Select(m => m.Mode == "lora"
                    ? ". LoRA step: causal-LM cross-entropy (with a frozen head, computed per chunk of tokens without forming the whole logits), backward, AdamW on the adapters"
                    : ". Circuit-breaker step: a retain and a CB batch of that size; frozen passes with adapters disabled, adapted passes, retain loss over all hidden states + RR loss at the targets, " +
                      $"coefficients {TrainingStep.MidScheduleCoefficients.Retain} / {TrainingStep.MidScheduleCoefficients.Cb} (mid-schedule, every pass runs), clipping, AdamW")) + "."),
            new Paragraph($"Peak: {first.PeakSource}. 'after build' is the same difference right after the model and adapters were built. " +
                "Predicted: Core's per-GPU step model for MoeLora's runtime (grouped low-rank expert LoRA, no W+ΔW; SDPA attention, eager where MOELORA_ATTN_IMPLEMENTATION=eager or the layer has sinks), what max_memory_allocated would show" +
                (cuda ? "; the caching allocator's rounding and fragmentation come on top." : "; on the CPU the process peak includes allocator and runtime overheads the model does not describe, so the ratio is only indicative.") +
                " 'PEFT predicted': the same step under PyTorch + PEFT (ParamWrapper keeps W+ΔW of every adapted expert tensor for backward; sdpa attention), for context."),
        };
        foreach (var m in steps.Where(m => m.Note is not null)) blocks.Add(new Paragraph($"{m.Title}: {m.Note}."));
        return new Section("measured-steps", Text.Of(new Span("Measured training steps", Tone.Strong), new Span(" (--measure-steps)")), "measured.steps", blocks);
    }
}
