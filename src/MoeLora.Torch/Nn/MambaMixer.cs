using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// The Mamba-1 mixer (<see cref="MambaMixerSettings"/>; JambaMambaMixer) as transformers' torch path computes a whole
/// sequence without a cache (<c>causal_conv1d_fn</c> and the recurrent branch of <c>mamba_selective_scan</c>):
/// <code>
/// (x, z)    = chunk(in_proj(x · mask), 2)
/// x         = act(conv1d(x)) · mask                     causal depthwise convolution
/// (dt, B, C) = dt_layernorm, b_layernorm, c_layernorm of split(x_proj(x))
/// dt = softplus(dt_proj.weight · dt + dt_proj.bias);    A = −exp(A_log)   [inner, state]
/// h_t = exp(dt_t·A) ⊙ h_{t−1} + dt_t · x_t ⊗ B_t;        y_t = h_t · C_t + D ⊙ x_t     (per channel, in fp32)
/// out = out_proj(y · silu(z))
/// </code>
/// Like transformers, the mixer multiplies by <c>dt_proj.weight</c> itself rather than calling dt_proj, so an adapter
/// on dt_proj (PEFT wraps it under all-linear) never reaches the output.
/// </summary>
public sealed class MambaMixer : HfModule, IBlock
{
    public Parameter A_log { get; }
    public Parameter D { get; }
    public DepthwiseConv1d conv1d { get; }
    public Linear in_proj { get; }
    public Linear x_proj { get; }
    public Linear dt_proj { get; }
    public Linear out_proj { get; }
    public RmsNorm dt_layernorm { get; }
    public RmsNorm b_layernorm { get; }
    public RmsNorm c_layernorm { get; }
    readonly Activation _act;
    readonly MambaMixerSettings _s;

    public MambaMixer(long hidden, MambaMixerSettings s, Init init)
    {
        _s = s;
        // JambaPreTrainedModel._init_weights: A_log[i, n] = log(n + 1), D = 1; a checkpoint overwrites both.
        A_log = AddParameter("A_log", init.Generator is null ? init.Zeros(s.Inner, s.StateSize)
            : arange(1, s.StateSize + 1, ScalarType.Float32).log().expand(s.Inner, s.StateSize).contiguous().to(init.DType).to(init.Device));
        D = AddParameter("D", init.Ones(s.Inner));
        conv1d = AddChild("conv1d", new DepthwiseConv1d(s.Inner, s.Kernel, init, s.ConvBias));
        _act = AddChild("act", new Activation(s.Act));
        in_proj = AddChild("in_proj", new Linear(hidden, s.Inner * 2, s.Bias, init));
        x_proj = AddChild("x_proj", new Linear(s.Inner, s.DtRank + 2 * s.StateSize, false, init));
        dt_proj = AddChild("dt_proj", new Linear(s.DtRank, s.Inner, true, init));
        out_proj = AddChild("out_proj", new Linear(s.Inner, hidden, s.Bias, init));
        dt_layernorm = AddChild("dt_layernorm", new RmsNorm(s.DtRank, s.NormEps, init));
        b_layernorm = AddChild("b_layernorm", new RmsNorm(s.StateSize, s.NormEps, init));
        c_layernorm = AddChild("c_layernorm", new RmsNorm(s.StateSize, s.NormEps, init));
    }

    public Tensor Forward(Tensor input, ForwardContext ctx)
    {
        var dtype = input.dtype;
        var mask = ctx.AttentionMask;
        var halves = in_proj.Forward(ShortConv.MaskPadding(input, mask)).chunk(2, -1);
        var (x, gate) = (halves[0], halves[1]);
        x = _act.Forward(conv1d.Causal(x.transpose(1, 2)).transpose(1, 2));
        x = ShortConv.MaskPadding(x, mask);
        var parts = x_proj.Forward(x).split([_s.DtRank, _s.StateSize, _s.StateSize], -1);
        var dtLow = dt_layernorm.Forward(parts[0]);
        var bm = b_layernorm.Forward(parts[1]);
        var cm = c_layernorm.Forward(parts[2]);
        // transformers: dt_proj.weight @ time_step (no call to dt_proj); the scan adds the bias and takes the softplus
        // in that product's dtype.
        var dt = nn.functional.softplus(matmul(dtLow, dt_proj.weight.t()) + dt_proj.bias!);
        var a = A_log.to(ScalarType.Float32).exp().neg();
        var y = SelectiveScan(x, dt, a, bm, cm) + x * D.to(ScalarType.Float32);
        y = y * nn.functional.silu(gate);
        return out_proj.Forward(y.to(dtype));
    }

    /// <summary>
    /// The recurrent branch of transformers' <c>mamba_selective_scan</c>, zero initial state: <paramref name="x"/>
    /// [b, l, d], <paramref name="dt"/> [b, l, d] (after softplus), <paramref name="a"/> [d, n] (A, fp32),
    /// <paramref name="bm"/> and <paramref name="cm"/> [b, l, n]. The state is kept in fp32 and read out in x's dtype
    /// (<c>ssm_state.to(input_dtype) @ C</c>). Returns y [b, l, d] without the D term.
    /// </summary>
    internal static Tensor SelectiveScan(Tensor x, Tensor dt, Tensor a, Tensor bm, Tensor cm)
    {
        long b = x.shape[0], l = x.shape[1], d = x.shape[2], n = a.shape[1];
        var dtype = x.dtype;
        dt = dt.to(ScalarType.Float32);
        var decay = (a.unsqueeze(0).unsqueeze(0) * dt.unsqueeze(-1)).exp();                          // [b, l, d, n]
        var input = dt.unsqueeze(-1) * bm.to(ScalarType.Float32).unsqueeze(2) * x.to(ScalarType.Float32).unsqueeze(-1);
        var state = zeros([b, d, n], ScalarType.Float32, x.device);
        var outputs = new List<Tensor>((int)l);
        for (long t = 0; t < l; t++)
        {
            state = decay.select(1, t) * state + input.select(1, t);
            outputs.Add(matmul(state.to(dtype), cm.select(1, t).to(dtype).unsqueeze(-1)).squeeze(-1));
        }
        return stack(outputs, 1);
    }
}
