using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using TorchSharp;
using static TorchSharp.torch;
using MoeLora.Core;
using MoeLora.Torch.Runtime;

namespace MoeLora.Torch.Training;

/// <summary>
/// transformers' <c>ForCausalLMLoss</c>: logits upcast to fp32, labels shifted left by one with -100 padding the last
/// position (and masked positions), mean cross-entropy over the counted tokens.
/// </summary>
public static class CausalLmLoss
{
    public static Tensor Compute(Tensor logits, Tensor inputIds, Tensor? attentionMask = null) =>
        nn.functional.cross_entropy(logits.to(ScalarType.Float32).reshape(-1, logits.shape[^1]),
            ShiftedLabels(inputIds, attentionMask, logits.device).reshape(-1), ignore_index: -100);

    /// <summary>The labels [B, S]: the next token at each position, -100 at the last one and where the mask is 0.</summary>
    public static Tensor ShiftedLabels(Tensor inputIds, Tensor? attentionMask, Device device)
    {
        using var scope = NewDisposeScope();
        var labels = inputIds.to(device);
        if (attentionMask is not null) labels = labels.masked_fill(attentionMask.to(device).eq(0), -100);
        long b = labels.shape[0], s = labels.shape[1];
        var pad = full([b, 1], -100L, ScalarType.Int64, device);
        return (s > 1 ? cat([labels.narrow(1, 1, s - 1), pad], 1) : pad).MoveToOuterDisposeScope();
    }
}

/// <summary>One warm-up step then the timed ones: per-step seconds and losses (index 0 is the warm-up).</summary>
public sealed record StepRun(string Mode, IReadOnlyList<double> Seconds, IReadOnlyList<double> Losses, long TokensPerStep)
{
    /// <summary>Median of the timed steps (the warm-up only when nothing else ran).</summary>
    public double MedianSeconds
    {
        get
        {
            var t = (Seconds.Count > 1 ? Seconds.Skip(1) : Seconds).Order().ToList();
            return t.Count % 2 == 1 ? t[t.Count / 2] : (t[t.Count / 2 - 1] + t[t.Count / 2]) / 2;
        }
    }

    public double TokensPerSecond => TokensPerStep / MedianSeconds;

    /// <summary>The last step's loss.</summary>
    public double Loss => Losses[^1];
}

/// <summary>
/// Whole training steps on an adapted model, for measuring speed and memory: a supervised LoRA step and the
/// circuit-breaker step of <see cref="CircuitBreakerTrainer"/>. Inputs are random token ids from a seeded CPU
/// generator (the same ids on every device), every token real (attention mask of ones).
/// </summary>
public static class TrainingStep
{
    const double LearningRate = 1e-4;

    /// <summary>
    /// <paramref name="repeats"/> + 1 LoRA steps (the first a warm-up): cross-entropy on <paramref name="batch"/> ×
    /// <paramref name="tokens"/> random ids, backward, AdamW on the adapters.
    /// </summary>
    public static StepRun Lora(CausalLm model, int batch, int tokens, int repeats, long seed)
    {
        Check(batch, tokens, repeats);
        using var optimizer = new AdamW(LoraInjector.PeftNamedParameters(model).ToList());
        var gen = new Generator((ulong)seed + 17);
        model.Train();
        try
        {
            return Run("lora", repeats, (long)batch * tokens, model.Device, () =>
            {
                var ids = RandomIds(model, batch, tokens, gen);
                MemTrace.Mark("lora step start", model.Device);
                var loss = model.CausalLmLoss(ids, ones_like(ids));
                MemTrace.Mark("lora forward + loss", model.Device);
                loss.backward();
                Nn.BackwardHandles.Release();
                MemTrace.Mark("lora backward", model.Device);
                optimizer.Step(LearningRate);
                optimizer.ZeroGrad();
                MemTrace.Mark("lora optimizer step", model.Device);
                // Read last: reading it before the optimizer would make the host wait for backward's last kernels
                // before queueing AdamW's.
                return loss.item<float>();
            });
        }
        finally { model.Eval(); ClearGradients(model); }
    }

    /// <summary>
    /// <paramref name="repeats"/> + 1 circuit-breaker steps as the trainer runs one micro-batch: frozen retain and CB
    /// passes with adapters disabled, adapted passes, <c>c_retain·L_ret + c_cb·L_rr</c>, backward, gradient clipping
    /// (max norm 1), AdamW. Coefficients are the reference's "dual" schedule (α = 5) at step 30 of 150 (0.5 / 4.5), so
    /// every pass runs. The retain and CB batches are <paramref name="batch"/> × <paramref name="tokens"/> each.
    /// </summary>
    public static StepRun CircuitBreaker(CausalLm model, IReadOnlyList<int> targetLayers, int batch, int tokens, int repeats, long seed)
    {
        Check(batch, tokens, repeats);
        var trainable = LoraInjector.PeftNamedParameters(model).ToList();
        using var optimizer = new AdamW(trainable);
        var (retainCoeff, cbCoeff) = MidScheduleCoefficients;
        var gen = new Generator((ulong)seed + 29);
        try
        {
            return Run("cb", repeats, 2L * batch * tokens, model.Device, () =>
            {
                var retainIds = RandomIds(model, batch, tokens, gen);
                var cbIds = RandomIds(model, batch, tokens, gen);
                MemTrace.Mark("cb step start", model.Device);
                var r = CircuitBreakerLoss.Compute(model, new TokenBatch(cbIds, ones_like(cbIds)), new TokenBatch(retainIds, ones_like(retainIds)),
                    targetLayers, retainCoeff, cbCoeff);
                MemTrace.Mark("cb forward passes + loss", model.Device);
                r.Total.backward();
                Nn.BackwardHandles.Release();
                MemTrace.Mark("cb backward", model.Device);
                GradClip.ClipGradNorm(trainable.Select(p => p.Param), 1.0);
                optimizer.Step(LearningRate);
                optimizer.ZeroGrad();
                MemTrace.Mark("cb optimizer step", model.Device);
                return r.Read().TotalValue;
            });
        }
        finally { model.Eval(); ClearGradients(model); }
    }

    /// <summary>(retain, CB) coefficients of the measured step: "dual", α = 5, step 30 of 150 (bench/gpu/peft_step.py uses the same).</summary>
    public static (double Retain, double Cb) MidScheduleCoefficients => CoefficientSchedule.Create("dual", 5.0, 150).At(30);

    static void Check(int batch, int tokens, int repeats)
    {
        if (batch < 1) throw new UserInputException($"step batch must be at least 1, got {batch}");
        if (tokens < 2) throw new UserInputException($"step tokens must be at least 2 (a causal-LM loss needs a next token), got {tokens}");
        if (repeats < 1) throw new UserInputException($"step repeats must be at least 1, got {repeats}");
    }

    static Tensor RandomIds(CausalLm model, int batch, int tokens, Generator gen) =>
        randint(0, model.VocabSize, [batch, tokens], generator: gen, dtype: ScalarType.Int64).to(model.Device);

    static StepRun Run(string mode, int repeats, long tokensPerStep, Device device, Func<double> step)
    {
        var seconds = new List<double>();
        var losses = new List<double>();
        var sw = new System.Diagnostics.Stopwatch();
        for (int i = 0; i <= repeats; i++)
        {
            Synchronize(device);
            sw.Restart();
            using (NewDisposeScope()) losses.Add(step());
            // The optimizer's kernels are queued after the loss was read: wait for them before stopping the clock.
            Synchronize(device);
            seconds.Add(sw.Elapsed.TotalSeconds);
        }
        return new StepRun(mode, seconds, losses, tokensPerStep);
    }

    static void Synchronize(Device device)
    {
        if (device.type == DeviceType.CUDA) cuda.synchronize(device);
    }

    static void ClearGradients(CausalLm model) => AdamW.FreeGradients(model.NamedParameters().Select(p => p.Param));
}
