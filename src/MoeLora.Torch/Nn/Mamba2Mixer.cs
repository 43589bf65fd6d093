using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// The Mamba-2 mixer (<see cref="Mamba2MixerSettings"/>; NemotronHMamba2Mixer, GraniteMoeHybridMambaLayer) as transformers' <c>torch_forward</c>
/// computes a whole sequence without a cache:
/// <code>
/// (z, xBC, dt) = in_proj(x · mask)
/// (x, B, C)    = act(conv1d(xBC)) · mask           causal depthwise convolution
/// dt = clamp(softplus(dt + dt_bias), bounds);     A = −exp(A_log)
/// h_t = exp(dt_t·A) h_{t−1} + dt_t · x_t ⊗ B_t;    y_t = h_t · C_t + D · x_t     (per head, in fp32)
/// out = out_proj(norm(y · silu(z)))                 RMSNorm per group of channels
/// </code>
/// The recurrence is evaluated as transformers does, chunk by chunk (the SSD form: within a chunk a masked
/// "attention" C·Bᵀ weighted by the decays, between chunks the carried states), which is the same sum in another
/// order; every step is differentiable, so gradients flow through the scan to A_log, dt_bias, D and the projections.
/// </summary>
public sealed class Mamba2Mixer : HfModule, IBlock
{
    public Parameter dt_bias { get; }
    public Parameter A_log { get; }
    public Parameter D { get; }
    public DepthwiseConv1d conv1d { get; }
    public Linear in_proj { get; }
    public MambaRmsNormGated norm { get; }
    public Linear out_proj { get; }
    readonly Activation _act;
    readonly Mamba2MixerSettings _s;

    public Mamba2Mixer(long hidden, Mamba2MixerSettings s, Init init)
    {
        _s = s;
        // transformers' _init_weights: A_log = log(1..heads), D = 1, dt_bias = softplus⁻¹ of a log-uniform dt
        // (Nemotron-H) or 1 (GraniteMoeHybrid); a checkpoint overwrites all three.
        dt_bias = AddParameter("dt_bias", init.Generator is null || s.InitialDt is null ? init.Ones(s.Heads) : InverseSoftplusDt(s.InitialDt.Value, s.Heads, init));
        A_log = AddParameter("A_log", init.Generator is null ? init.Zeros(s.Heads)
            : arange(1, s.Heads + 1, ScalarType.Float32).log().to(init.DType).to(init.Device));
        D = AddParameter("D", init.Ones(s.Heads));
        _act = AddChild("act", new Activation(s.Act));
        conv1d = AddChild("conv1d", new DepthwiseConv1d(s.ConvDim, s.Kernel, init, s.ConvBias));
        in_proj = AddChild("in_proj", new Linear(hidden, s.Inner + s.ConvDim + s.Heads, s.Bias, init));
        norm = AddChild("norm", new MambaRmsNormGated(s.Inner, s.NormGroupSize, s.NormEps, init));
        out_proj = AddChild("out_proj", new Linear(s.Inner, hidden, s.Bias, init));
    }

    static Tensor InverseSoftplusDt((double Min, double Max, double Floor) range, long heads, Init init)
    {
        using var _ = no_grad();
        double lo = Math.Log(range.Min), hi = Math.Log(range.Max);
        var dt = (rand([heads], generator: init.Generator) * (hi - lo) + lo).exp().clamp_min(range.Floor);
        return (dt + (-dt).expm1().neg().log()).to(init.DType).to(init.Device);
    }

    public Tensor Forward(Tensor input, ForwardContext ctx)
    {
        long b = input.shape[0], l = input.shape[1];
        var dtype = input.dtype;
        // Zeroing padded positions is the identity on unpadded rows, so it runs whenever transformers would pass a mask.
        bool masked = !_s.MaskBatchedOnly || (b > 1 && l > 1);
        var mask = ctx.AttentionMask;
        var projected = in_proj.Forward(masked ? ShortConv.MaskPadding(input, mask) : input);
        var parts = projected.split([_s.Inner, _s.ConvDim, _s.Heads], -1);
        var (gate, xbc, dt) = (parts[0], parts[1], parts[2]);
        xbc = _act.Forward(conv1d.Causal(xbc.transpose(1, 2)).transpose(1, 2));
        if (masked) xbc = ShortConv.MaskPadding(xbc, mask);
        long gn = _s.Groups * _s.StateSize, rep = _s.Heads / _s.Groups;
        var xs = xbc.split([_s.Inner, gn, gn], -1);
        var a = A_log.to(ScalarType.Float32).exp().neg();                                  // [h]
        dt = nn.functional.softplus(dt + dt_bias);                                        // [b, l, h]
        dt = double.IsPositiveInfinity(_s.TimeStepClamp.Max) ? dt.clamp_min(_s.TimeStepClamp.Min) : dt.clamp(_s.TimeStepClamp.Min, _s.TimeStepClamp.Max);
        var x = xs[0].reshape(b, l, _s.Heads, _s.HeadDim).to(ScalarType.Float32);
        var bm = xs[1].reshape(b, l, _s.Groups, _s.StateSize).to(ScalarType.Float32).repeat_interleave(rep, 2);
        var cm = xs[2].reshape(b, l, _s.Groups, _s.StateSize).to(ScalarType.Float32).repeat_interleave(rep, 2);
        var y = Ssd(x * dt.unsqueeze(-1), a * dt, bm, cm, _s.ChunkSize) + D.unsqueeze(-1) * x;
        var scan = norm.Forward(y.reshape(b, l, _s.Inner), gate);
        return out_proj.Forward(scan.to(dtype));
    }

    /// <summary>
    /// The chunked SSD scan of transformers' torch_forward, zero initial state: <paramref name="x"/> [b, l, h, p]
    /// (already times dt), <paramref name="a"/> [b, l, h] (A·dt), <paramref name="bm"/> and <paramref name="cm"/>
    /// [b, l, h, n]. Returns y [b, l, h, p] without the D term.
    /// </summary>
    internal static Tensor Ssd(Tensor x, Tensor a, Tensor bm, Tensor cm, long chunk)
    {
        long b = x.shape[0], l = x.shape[1], h = x.shape[2], p = x.shape[3], n = bm.shape[3];
        long pad = (chunk - l % chunk) % chunk, c = (l + pad) / chunk;
        Tensor Chunks(Tensor t) => nn.functional.pad(t, [.. Enumerable.Repeat(0L, 2 * ((int)t.dim() - 2)), 0, pad])
            .reshape([b, c, chunk, .. t.shape[2..]]);
        x = Chunks(x); bm = Chunks(bm); cm = Chunks(cm);
        var ac = Chunks(a).permute(0, 3, 1, 2);                                               // [b, h, c, L]
        var cum = ac.cumsum(-1);

        // Within each chunk: y_i = Σ_{j≤i} (C_i·B_j) exp(Σ_{j<k≤i} A_k) x_j.
        var decay = SegmentSum(ac).exp();                                                     // [b, h, c, L, L]
        var scores = einsum("bclhn,bcshn->bchls", cm, bm) * decay.permute(0, 2, 1, 3, 4);
        var yDiag = einsum("bchls,bcshp->bclhp", scores, x);

        // Each chunk's final state, then the states carried across chunks (the first starts from zero).
        var toEnd = (cum[.., .., .., (int)(chunk - 1)..] - cum).exp();                          // [b, h, c, L]
        var states = einsum("bclhn,bclhp->bchpn", bm * toEnd.permute(0, 2, 3, 1).unsqueeze(-1), x);
        states = cat([zeros_like(states[.., ..1]), states], 1);                               // [b, c+1, h, p, n]
        var chunkDecay = SegmentSum(nn.functional.pad(cum[.., .., .., -1], [1, 0])).exp();    // [b, h, c+1, c+1]
        states = einsum("bhzc,bchpn->bzhpn", chunkDecay, states)[.., ..(int)c];

        // What the carried state contributes at each position of the next chunk.
        var yOff = einsum("bclhn,bchpn->bclhp", cm, states) * cum.exp().permute(0, 2, 3, 1).unsqueeze(-1);
        return (yDiag + yOff).reshape(b, c * chunk, h, p)[.., ..(int)l];
    }

    /// <summary>
    /// [..., T] → [..., T, T] with entry (i, j) = Σ_{j&lt;k≤i} x_k for j ≤ i and −∞ above the diagonal (transformers'
    /// cumulative-sum form, which avoids subtracting large cumulative sums).
    /// </summary>
    static Tensor SegmentSum(Tensor x)
    {
        long t = x.shape[^1];
        var expanded = x.unsqueeze(-1).expand([.. x.shape, t]);
        var strictlyLower = ones(t, t, ScalarType.Bool, x.device).tril(-1);
        var sums = expanded.masked_fill(strictlyLower.logical_not(), 0).cumsum(-2);
        return sums.masked_fill(ones(t, t, ScalarType.Bool, x.device).tril(0).logical_not(), double.NegativeInfinity);
    }
}

/// <summary>
/// Mamba-2's gated norm (transformers' MambaRMSNormGated family: Zamba2RMSNormGated for Nemotron-H,
/// GraniteMoeHybridRMSNormGated): <c>weight · rmsnorm(y · silu(z))</c> in fp32, the gate applied before the RMS (unlike
/// Gated DeltaNet's <see cref="RmsNormGated"/>, which gates after), the RMS taken over groups of <c>group_size</c>
/// channels, the result cast to the input's dtype before the weight.
/// </summary>
public sealed class MambaRmsNormGated : HfModule
{
    public Parameter weight { get; }
    readonly long _groupSize;
    readonly double _eps;

    public MambaRmsNormGated(long size, long groupSize, double eps, Init init)
    {
        _groupSize = groupSize; _eps = eps;
        weight = AddParameter("weight", init.Ones(size));
    }

    public Tensor Forward(Tensor x, Tensor gate)
    {
        var dt = x.dtype;
        var h = x.to(ScalarType.Float32) * nn.functional.silu(gate.to(ScalarType.Float32));
        var shape = h.shape;
        var g = h.view([.. shape[..^1], shape[^1] / _groupSize, _groupSize]);
        g = g * rsqrt(g.pow(2).mean([-1], keepdim: true) + _eps);
        return weight * g.view(shape).to(dt);
    }
}
