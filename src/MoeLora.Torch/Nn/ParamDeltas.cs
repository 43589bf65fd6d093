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
