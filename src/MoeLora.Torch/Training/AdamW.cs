using TorchSharp;
using static TorchSharp.torch;
using MoeLora.Core;

namespace MoeLora.Torch.Training;

/// <summary>
/// torch.optim.AdamW (non-amsgrad, non-fused) written out so its state is plain named tensors that checkpoints save and
/// restore exactly: p ← p·(1−lr·wd); m ← lerp(m, g, 1−β1); v ← β2·v + (1−β2)·g²;
/// p ← p − lr/(1−β1^t) · m / (√v/√(1−β2^t) + ε).
/// <para>
/// The step runs those operations on lists of parameters at once (torch's <c>_foreach_*</c> operators, as its foreach
/// path does, reached through a TorchScript unit since TorchSharp 0.107 binds none): a few multi-tensor kernels per group
/// instead of seven kernels per parameter (a Qwen3-30B-A3B adapter has 576), with the same arithmetic per element.
/// Groups hold at most <see cref="GroupBytes"/> of fp32 parameters, which bounds the square-root temporaries alive at
/// once. Other dtypes, and every parameter without the operators (an older libtorch), go through the per-parameter loop.
/// </para>
/// </summary>
public sealed class AdamW : IDisposable
{
    public IReadOnlyList<(string Name, Parameter Param)> Parameters { get; }
    public double Beta1 { get; }
    public double Beta2 { get; }
    public double Eps { get; }
    public double WeightDecay { get; }
    public long StepCount { get; private set; }
    readonly Dictionary<string, (Tensor M, Tensor V)> _state = [];

    public AdamW(IEnumerable<(string Name, Parameter Param)> parameters, double beta1 = 0.9, double beta2 = 0.999, double eps = 1e-8, double weightDecay = 0.0)
    {
        Parameters = parameters.ToList();
        if (Parameters.Count == 0) throw new UserInputException("nothing to train: no parameter requires a gradient.");
        Beta1 = beta1; Beta2 = beta2; Eps = eps; WeightDecay = weightDecay;
        foreach (var (n, p) in Parameters)
        {
            var m = zeros_like(p).DetachFromDisposeScope();
            var v = zeros_like(p).DetachFromDisposeScope();
            _state[n] = (m, v);
        }
    }

    /// <summary>The most parameter bytes one multi-tensor group updates (its square roots are alive at once).</summary>
    internal long GroupBytes { get; init; } = 256L << 20;

    /// <summary>False: the per-parameter loop even where the multi-tensor operators exist (tests compare the two).</summary>
    internal bool MultiTensor { get; set; } = true;

    const string ForeachScript = """
        def adamw(params: List[Tensor], grads: List[Tensor], m: List[Tensor], v: List[Tensor], decay: float, beta1: float, beta2: float, eps: float, step_size: float, bc2_sqrt: float):
            if decay != 1.0:
                torch._foreach_mul_(params, decay)
            torch._foreach_lerp_(m, grads, 1.0 - beta1)
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, 1.0 - beta2)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, m, denom, -step_size)

        """;

    static readonly Lazy<torch.jit.CompilationUnit?> Foreach = Runtime.TorchScriptUnit.Lazy(ForeachScript);

    /// <summary>Whether this libtorch has the multi-tensor operators.</summary>
    internal static bool MultiTensorAvailable => Foreach.Value is not null;

    public void Step(double lr)
    {
        StepCount++;
        using var scope = NewDisposeScope();
        using var _ = no_grad();
        double bc1 = 1 - Math.Pow(Beta1, StepCount), bc2 = 1 - Math.Pow(Beta2, StepCount);
        double stepSize = lr / bc1, bc2Sqrt = Math.Sqrt(bc2);
        var looped = Parameters;
        if (MultiTensor && Foreach.Value is { } unit)
        {
            // Scalars made and held here: TorchSharp 0.107's invoke turns a double argument into a Scalar it does not
            // keep alive, which the finaliser could free while libtorch still reads it.
            var scalars = new[] { 1 - lr * WeightDecay, Beta1, Beta2, Eps, stepSize, bc2Sqrt }.Select(v => v.ToScalar()).ToArray();
            try
            {
                foreach (var group in Groups())
                {
                    using var inner = NewDisposeScope();
                    unit.invoke("adamw", [group.Select(x => (Tensor)x.Param).ToArray(), group.Select(x => x.Param.grad!).ToArray(),
                        group.Select(x => _state[x.Name].M).ToArray(), group.Select(x => _state[x.Name].V).ToArray(), .. scalars]);
                }
            }
            finally { foreach (var x in scalars) x.Dispose(); }
            looped = Parameters.Where(x => x.Param.dtype != ScalarType.Float32).ToList();
        }
        foreach (var (n, p) in looped)
        {
            var g = p.grad;
            if (g is null) continue;
            var (m, v) = _state[n];
            if (WeightDecay != 0) p.mul_(1 - lr * WeightDecay);
            m.lerp_(g, 1 - Beta1);
            v.mul_(Beta2).addcmul_(g, g, 1 - Beta2);
            // One parameter-sized temporary at a time, freed before the next parameter: kept in the step's scope,
            // the square roots of every parameter would add twice the trainable bytes at the step's peak (measured on
            // an H100: a checkpointed Qwen3-30B-A3B LoRA step ran out of memory at 77.9 GiB for this alone).
            using var denom = v.sqrt();
            denom.div_(bc2Sqrt).add_(Eps);
            p.addcdiv_(m, denom, -stepSize);
        }
    }

    /// <summary>
    /// The fp32 parameters with a gradient (the LoRA factors), in groups of one device of at most
    /// <see cref="GroupBytes"/> each. Others (a bf16 modules_to_save copy) stay in the loop: on them the multi-tensor
    /// operators round differently.
    /// </summary>
    IEnumerable<List<(string Name, Parameter Param)>> Groups()
    {
        foreach (var kind in Parameters.Where(x => x.Param.grad is not null && x.Param.dtype == ScalarType.Float32).GroupBy(x => x.Param.device.ToString()))
        {
            var group = new List<(string, Parameter)>();
            long bytes = 0;
            foreach (var x in kind)
            {
                long size = x.Param.numel() * x.Param.element_size();
                if (group.Count > 0 && bytes + size > GroupBytes) { yield return group; group = []; bytes = 0; }
                group.Add(x);
                bytes += size;
            }
            if (group.Count > 0) yield return group;
        }
    }

    /// <summary>Frees the moments (they live outside any dispose scope), e.g. before another model is built on the device.</summary>
    public void Dispose()
    {
        foreach (var (m, v) in _state.Values) { m.Dispose(); v.Dispose(); }
        _state.Clear();
    }

    /// <summary>
    /// Frees the gradients, as torch's <c>zero_grad()</c> does by default (<c>set_to_none=True</c>). Zeroed gradients
    /// would stay on the device through the next forward and be held alongside its activations at the start of backward:
    /// the trainable bytes again (3.7 GiB for Qwen3-30B-A3B with the seed targets). Freed, the next backward allocates
    /// them as it reaches each layer, and <see cref="Step"/> skips a parameter that got none, as torch's AdamW does.
    /// </summary>
    public void ZeroGrad() => FreeGradients(Parameters.Select(x => x.Param));

    /// <summary>
    /// Drops each parameter's gradient and disposes the handle read to reach it, so that the device memory goes now,
    /// not when .NET's finaliser gets to the handle.
    /// </summary>
    public static void FreeGradients(IEnumerable<Parameter> parameters)
    {
        foreach (var p in parameters)
        {
            if (p.grad is not { } g) continue;
            p.grad = null;
            g.Dispose();
        }
    }

    /// <summary>Optimizer state as named tensors (exp_avg.NAME, exp_avg_sq.NAME).</summary>
    public IEnumerable<KeyValuePair<string, Tensor>> StateTensors()
    {
        foreach (var (n, p) in Parameters)
        {
            yield return new("exp_avg." + n, _state[n].M);
            yield return new("exp_avg_sq." + n, _state[n].V);
        }
    }

    public void LoadState(IReadOnlyDictionary<string, Tensor> tensors, long stepCount)
    {
        using var _ = no_grad();
        foreach (var (n, _) in Parameters)
        {
            if (!tensors.TryGetValue("exp_avg." + n, out var m) || !tensors.TryGetValue("exp_avg_sq." + n, out var v))
                throw new InvalidDataException($"checkpoint optimizer state has no entry for {n}: it was written for a different adapter.");
            if (!m.shape.SequenceEqual(_state[n].M.shape) || !v.shape.SequenceEqual(_state[n].V.shape))
                throw new InvalidDataException($"checkpoint optimizer state for {n} is [{string.Join(",", m.shape)}], the adapter's [{string.Join(",", _state[n].M.shape)}]: it was written for a different adapter.");
            _state[n].M.copy_(m); _state[n].V.copy_(v);
        }
        StepCount = stepCount;
    }
}

/// <summary>
/// torch.nn.utils.clip_grad_norm_(params, max_norm): total = ‖(‖g_i‖₂)_i‖₂, gradients scaled by
/// min(1, max_norm/(total+1e-6)) (a non-finite total makes them NaN, as torch's). Returns the total norm before
/// clipping as a 0-d fp32 tensor on the gradients' device, unread: like torch's, clipping never waits for the device.
/// </summary>
public static class GradClip
{
    public static Tensor ClipGradNorm(IEnumerable<Parameter> parameters, double maxNorm)
    {
        using var _ = no_grad();
        var grads = parameters.Select(p => p.grad).Where(g => g is not null).Select(g => g!).ToList();
        if (grads.Count == 0) return tensor(0f);
        using var scope = NewDisposeScope();
        var total = stack(grads.Select(g => g.flatten().norm(0, false, 2).to(ScalarType.Float32)).ToArray()).norm(0, false, 2);
        if (maxNorm > 0)
        {
            var coef = (maxNorm / (total + 1e-6)).clamp_max(1.0);
            foreach (var g in grads) g.mul_(coef.to(g.dtype));
        }
        return total.MoveToOuterDisposeScope();
    }
}

/// <summary>Learning rate per optimizer step (0-based), HF-style: constant (the reference), linear or cosine decay, with optional linear warmup.</summary>
public sealed record LrSchedule(string Kind, double PeakLr, int TotalSteps, int WarmupSteps)
{
    public static readonly string[] Kinds = ["constant", "linear", "cosine"];

    public static LrSchedule Create(string kind, double lr, int totalSteps, int warmup)
    {
        if (!Kinds.Contains(kind)) throw new UserInputException($"--lr-schedule '{kind}' is unknown: use {string.Join(", ", Kinds)}.");
        if (!(lr > 0)) throw new UserInputException("--lr must be positive.");
        if (warmup < 0 || warmup > totalSteps) throw new UserInputException("--warmup-steps must be between 0 and --total-steps.");
        return new LrSchedule(kind, lr, totalSteps, warmup);
    }

    public double At(int step)
    {
        if (step < WarmupSteps) return PeakLr * step / Math.Max(1, WarmupSteps);
        double progress = (double)(step - WarmupSteps) / Math.Max(1, TotalSteps - WarmupSteps);
        return Kind switch
        {
            "linear" => PeakLr * Math.Max(0, 1 - progress),
            "cosine" => PeakLr * 0.5 * (1 + Math.Cos(Math.PI * progress)),
            _ => PeakLr,
        };
    }
}
