using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

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
        conv = AddChild("conv", new DepthwiseConv1d(hidden, s.Kernel, init, s.Bias));
        in_proj = AddChild("in_proj", new Linear(hidden, 3 * hidden, s.Bias, init));
        out_proj = AddChild("out_proj", new Linear(hidden, hidden, s.Bias, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        if (x.shape[0] > 1 && x.shape[1] > 1) x = MaskPadding(x, ctx.AttentionMask);
        var bcx = in_proj.Forward(x).transpose(-1, -2).chunk(3, -2);    // each [B, H, S]
        var y = bcx[1] * conv.Causal(bcx[0] * bcx[2]);
        return out_proj.Forward(y.transpose(-1, -2).contiguous());
    }

    /// <summary><c>(x · mask[:, :, None]).to(x.dtype)</c>: zero at padded positions.</summary>
    internal static Tensor MaskPadding(Tensor x, Tensor attentionMask) => (x * attentionMask.unsqueeze(-1)).to(x.dtype);
}
