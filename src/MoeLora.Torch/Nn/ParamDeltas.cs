using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// Applies attached ParamWrapper deltas to a 2-D parameter (router weights): <c>W + Σ ΔW</c> over the enabled deltas
/// (a disabled adapter leaves the parameter unchanged, as PEFT's <c>disable_adapter()</c>).
/// </summary>
internal static class ParamDeltas
{
    public static Tensor Apply(Tensor weight, IReadOnlyList<IParamDelta> deltas)
    {
        var w = weight;
        foreach (var d in deltas) if (d.Enabled) w = w + d.Delta().to(weight.dtype);
        return w;
    }
}

/// <summary>A 2-D delta in low-rank form: ΔW = L · R, L (out, r) with the scaling folded in, R (r, in).</summary>
public interface ILowRankDelta : IParamDelta
{
    (Tensor L, Tensor R) Factors();
}

/// <summary>
/// A module whose own 2-D parameters (other than a Linear's <c>weight</c>) take ParamWrapper deltas, applied where it
/// uses them (DBRX's stacked expert matrices w1, v1, w2).
/// </summary>
internal interface IParamDeltaOwner
{
    void AttachDelta(string parameterName, IParamDelta delta);
}
