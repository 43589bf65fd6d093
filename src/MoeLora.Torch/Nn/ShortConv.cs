using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// <c>nn.Conv1d</c> with <c>groups = channels</c> (one kernel per channel): weight [C, 1, K], optional bias [C]. Run
/// causally: padded by K−1 on both sides as transformers builds it, and only the first S outputs kept, so position t
/// sees inputs t−K+1..t. Never a LoRA target here (Core's tree marks it as a module PEFT does not wrap).
/// </summary>
public sealed class DepthwiseConv1d : HfModule
{
    public Parameter weight { get; }
    public Parameter? bias { get; }
    readonly long _kernel;

    public DepthwiseConv1d(long channels, long kernel, bool hasBias, Init init)
    {
        _kernel = kernel;
        weight = AddParameter("weight", init.Normal(channels, 1, kernel));
        if (hasBias) bias = AddParameter("bias", init.Zeros(channels));
    }

    /// <param name="x">[B, C, S] (channels first, as nn.Conv1d).</param>
    /// <returns>[B, C, S].</returns>
    public Tensor Forward(Tensor x)
    {
        long s = x.shape[2];
        var y = nn.functional.conv1d(x, weight, bias, padding: _kernel - 1, groups: weight.shape[0]);
        return y[.., .., ..(int)s];
    }
}

/// <summary>
/// LFM2's short convolution (<see cref="ShortConvSettings"/>), transformers' slow (torch) path without a cache:
/// (B, C, x) = chunk(in_proj(x)ᵀ, 3), <c>out_proj((C · conv(B · x))ᵀ)</c>. Padded positions are zeroed before in_proj
/// when the batch has more than one row and position (<c>apply_mask_to_padding_states</c>), so a left-padded row's
/// padding does not leak into its first real positions through the causal convolution.
/// </summary>
public sealed class ShortConv : HfModule, IBlock
{
    public DepthwiseConv1d conv { get; }
    public Linear in_proj { get; }
    public Linear out_proj { get; }

    public ShortConv(long hidden, ShortConvSettings s, Init init)
    {
        conv = AddChild("conv", new DepthwiseConv1d(hidden, s.Kernel, s.Bias, init));
        in_proj = AddChild("in_proj", new Linear(hidden, 3 * hidden, s.Bias, init));
        out_proj = AddChild("out_proj", new Linear(hidden, hidden, s.Bias, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        if (x.shape[0] > 1 && x.shape[1] > 1) x = MaskPadding(x, ctx.AttentionMask);
        var bcx = in_proj.Forward(x).transpose(-1, -2).chunk(3, -2);    // each [B, H, S]
        var y = bcx[1] * conv.Forward(bcx[0] * bcx[2]);
        return out_proj.Forward(y.transpose(-1, -2).contiguous());
    }

    /// <summary><c>(x · mask[:, :, None]).to(x.dtype)</c>: zero at padded positions.</summary>
    internal static Tensor MaskPadding(Tensor x, Tensor attentionMask) => (x * attentionMask.unsqueeze(-1)).to(x.dtype);
}
