using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>The <see cref="AttentionOptions"/> computations of <see cref="StandardAttention"/>.</summary>
public static class AttentionExtras
{
    /// <summary>
    /// Cohere's rope: angles repeat-interleaved (f0, f0, f1, f1, …), pairs (x[2i], x[2i+1]) rotated as
    /// (x·cos + rot(x)·sin) with rot = (-x[2i+1], x[2i]), computed in fp32 and cast back. x is [B, heads, S, d].
    /// </summary>
    public static Tensor ApplyInterleavedPairs(Tensor x, Rotary rope, Tensor positions)
    {
        var f = rope.Freqs(positions).repeat_interleave(2, -1);            // [B, S, d]
        var cos = (f.cos() * rope.AttentionScaling).to(x.dtype).to(ScalarType.Float32).unsqueeze(1);
        var sin = (f.sin() * rope.AttentionScaling).to(x.dtype).to(ScalarType.Float32).unsqueeze(1);
        var xf = x.to(ScalarType.Float32);
        var s = xf.shape;
        var pairs = xf.view(s[0], s[1], s[2], s[3] / 2, 2);
        var rot = stack([-pairs[.., .., .., .., 1], pairs[.., .., .., .., 0]], -1).flatten(-2);
        return (xf * cos + rot * sin).to(x.dtype);
    }

    /// <summary>The attention output [B, S, heads·d] times its gate's weights (per element or per head).</summary>
    public static Tensor Gate(Tensor o, Linear proj, OutputGate gate, Tensor x, long headDim)
    {
        var g = proj.Forward(x);
        g = gate.Kind switch
        {
            OutputGateKind.Sigmoid => nn.functional.sigmoid(g),
            OutputGateKind.Softplus => nn.functional.softplus(g.to(ScalarType.Float32)).to(o.dtype),
            _ => throw new NotSupportedException($"output gate {gate.Kind} has no runtime block."),
        };
        if (!gate.PerHead) return o * g;
        var s = o.shape;
        return (o.view(s[0], s[1], -1, headDim) * g.unsqueeze(-1)).view(s[0], s[1], -1);
    }
}
