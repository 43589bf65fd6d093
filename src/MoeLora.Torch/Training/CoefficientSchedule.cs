using MoeLora.Core;

namespace MoeLora.Torch.Training;

/// <summary>
/// Loss coefficients per step. <c>dual</c> (the reference): progress p = t/(2T), c_retain = α·p, c_cb = α·(1−p), with
/// t = 1..T the optimizer step (upstream counts compute_loss calls from 1 and divides by a hard-coded 300 = 2·150;
/// identical when gradient accumulation is 1). <c>constant</c>: c_retain = c_cb = α. <c>linear</c>: p = t/T, so the
/// coefficients reach (α, 0) at the end (the paper's schedule without the /2).
/// </summary>
public sealed record CoefficientSchedule(string Kind, double Alpha, int TotalSteps)
{
    public static readonly string[] Kinds = ["dual", "constant", "linear"];

    public static CoefficientSchedule Create(string kind, double alpha, int totalSteps)
    {
        if (!Kinds.Contains(kind)) throw new UserInputException($"--loss-weighting '{kind}' is unknown: use {string.Join(", ", Kinds)}.");
        if (totalSteps < 1) throw new UserInputException("--total-steps must be at least 1.");
        if (alpha <= 0 || double.IsNaN(alpha)) throw new UserInputException("--cb-alpha must be positive.");
        return new CoefficientSchedule(kind, alpha, totalSteps);
    }

    /// <summary>(retain_coeff, circuit_breaker_coeff) at optimizer step <paramref name="step"/> (1-based).</summary>
    public (double Retain, double Cb) At(int step) => Kind switch
    {
        "constant" => (Alpha, Alpha),
        "linear" => (Alpha * step / TotalSteps, Alpha * (1 - (double)step / TotalSteps)),
        _ => (Alpha * step / (2.0 * TotalSteps), Alpha * (1 - step / (2.0 * TotalSteps))),
    };
}
