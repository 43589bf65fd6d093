using TorchSharp;
using static TorchSharp.torch;
using static TorchSharp.torch.autograd;

namespace MoeLora.Torch.Lora;

/// <summary>
/// <c>linear(x.to(w.dtype), w)</c> that keeps <c>x</c> in its own dtype for backward.
/// <para>
/// PEFT casts a bf16 input to the fp32 adapter (<c>_cast_input_dtype</c>) before <c>lora_A</c>, and autograd then keeps
/// that fp32 copy for <c>lora_A</c>'s weight gradient: 4 bytes per input element, for every adapter (q, k and v each keep
/// their own). Widening bf16 or fp16 to fp32 is exact, so keeping the narrow input and widening it again in backward
/// gives the same gradients while keeping half the bytes, and adapters fed the same tensor (q, k, v) share it.
/// </para>
/// </summary>
internal sealed class CastLinear : SingleTensorFunction<CastLinear>
{
    public override string Name => nameof(CastLinear);

    /// <summary>y = x.to(w.dtype) @ wᵀ, with x kept as it is for backward; x must be narrower than w.</summary>
    public static Tensor Apply(Tensor x, Tensor w) => x.dtype != w.dtype
        ? apply(x, w)
        : throw new ArgumentException($"CastLinear needs an input narrower than the weight, got {x.dtype} for both.");

    public override Tensor forward(AutogradContext ctx, params object[] vars)
    {
        var x = (Tensor)vars[0];
        var w = (Tensor)vars[1];
        ctx.save_for_backward([x, w]);
        using var scope = NewDisposeScope();
        return nn.functional.linear(x.to(w.dtype), w).MoveToOuterDisposeScope();
    }

    public override List<Tensor> backward(AutogradContext ctx, Tensor gradOutput)
    {
        using var scope = NewDisposeScope();
        var saved = ctx.get_saved_variables();
        Tensor x = saved[0], w = saved[1];
        // As autograd's linear: grad_input = g·w (cast back, as .to's backward does), grad_weight = gᵀ·x in w's dtype.
        var gradInput = gradOutput.matmul(w).to(x.dtype);
        var gradWeight = gradOutput.reshape(-1, gradOutput.shape[^1]).t().mm(x.reshape(-1, x.shape[^1]).to(w.dtype));
        return Nn.BackwardHandles.Return(gradOutput, gradInput, gradWeight);
    }
}
