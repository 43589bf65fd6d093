using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// Kimi delta attention (<see cref="KimiDeltaAttentionSettings"/>, transformers' <c>KimiLinearDeltaAttention</c> on its
/// torch fallback path without cache): q/k/v projections, the causal depthwise convolution over q|k|v with its
/// activation, a per-channel forget gate (<see cref="KimiForgetGate"/>), β = sigmoid(b_proj(x)), the chunked delta rule
/// (<see cref="GatedDeltaRule"/> with one decay per key channel), the gated RMSNorm <c>o_norm</c> with
/// sigmoid(g_b_proj(g_a_proj(x))) and o_proj. Registered q_proj, k_proj, v_proj, conv1d, forget_gate, b_proj, g_a_proj,
/// g_b_proj, o_norm, o_proj, as transformers assigns them.
/// </summary>
public sealed class KimiDeltaAttention : HfModule, IBlock
{
    public Linear q_proj { get; }
    public Linear k_proj { get; }
    public Linear v_proj { get; }
    public DepthwiseConv1d conv1d { get; }
    public KimiForgetGate forget_gate { get; }
    public Linear b_proj { get; }
    public Linear g_a_proj { get; }
    public Linear g_b_proj { get; }
    public RmsNormGated o_norm { get; }
    public Linear o_proj { get; }
    readonly KimiDeltaAttentionSettings _s;
    readonly Activation _convAct;

    public KimiDeltaAttention(long hidden, KimiDeltaAttentionSettings s, Init init)
    {
        _s = s;
        long width = s.Width;
        q_proj = AddChild("q_proj", new Linear(hidden, width, false, init));
        k_proj = AddChild("k_proj", new Linear(hidden, width, false, init));
        v_proj = AddChild("v_proj", new Linear(hidden, width, false, init));
        conv1d = AddChild("conv1d", new DepthwiseConv1d(3 * width, s.ConvKernel, init));
        forget_gate = AddChild("forget_gate", new KimiForgetGate(hidden, s, init));
        b_proj = AddChild("b_proj", new Linear(hidden, s.Heads, false, init));
        g_a_proj = AddChild("g_a_proj", new Linear(hidden, s.HeadDim, false, init));
        g_b_proj = AddChild("g_b_proj", new Linear(s.HeadDim, width, false, init));
        o_norm = AddChild("o_norm", new RmsNormGated(s.HeadDim, s.NormEps, init, sigmoidInFp32: true));
        o_proj = AddChild("o_proj", new Linear(width, hidden, false, init));
        _convAct = new Activation(s.ConvAct);
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1], d = _s.HeadDim;
        // apply_mask_to_padding_states: padded positions enter as zeros, so (no bias anywhere) they write nothing to the
        // recurrent state and the real tokens of a left-padded row see exactly the row alone.
        x = (x * ctx.AttentionMask.unsqueeze(-1).to(x.dtype)).to(x.dtype);

        var mixed = cat([q_proj.Forward(x), k_proj.Forward(x), v_proj.Forward(x)], -1);
        var conv = _convAct.Forward(conv1d.Causal(mixed.transpose(1, 2))).transpose(1, 2);
        var parts = conv.split([_s.Width, _s.Width, _s.Width], -1);
        var q = parts[0].reshape(b, s, -1, d);
        var k = parts[1].reshape(b, s, -1, d);
        var v = parts[2].reshape(b, s, -1, d);

        var g = forget_gate.Forward(x);                                                       // [B, S, H, d], fp32
        var beta = b_proj.Forward(x).sigmoid();
        var core = GatedDeltaRule.Chunked(q, k, v, g, beta);                                  // [B, S, H, d]
        var gate = g_b_proj.Forward(g_a_proj.Forward(x)).view(b, s, -1, d);
        return o_proj.Forward(o_norm.Forward(core, gate).reshape(b, s, -1));
    }
}

/// <summary>
/// <c>KimiLinearForgetGate</c>: g = −exp(A_log) · softplus(f_b_proj(f_a_proj(x)) + dt_bias), one decay per head and
/// key channel [B, S, heads, head_dim], in fp32 (softplus as transformers writes it: x above 20, else log(1 + eˣ)).
/// Its own dt_bias and A_log enumerate before f_a_proj and f_b_proj.
/// </summary>
public sealed class KimiForgetGate : HfModule
{
    public Parameter dt_bias { get; }
    public Parameter A_log { get; }
    public Linear f_a_proj { get; }
    public Linear f_b_proj { get; }
    readonly long _headDim;

    public KimiForgetGate(long hidden, KimiDeltaAttentionSettings s, Init init)
    {
        _headDim = s.HeadDim;
        var (dtBias, aLog) = FlaInit(s, init);
        dt_bias = AddParameter("dt_bias", dtBias);
        A_log = AddParameter("A_log", aLog);
        f_a_proj = AddChild("f_a_proj", new Linear(hidden, s.HeadDim, false, init));
        f_b_proj = AddChild("f_b_proj", new Linear(s.HeadDim, s.Width, false, init));
    }

    // KimiLinearPreTrainedModel._init_weights (FLA's): A_log = log(uniform(1, 16)); dt = exp(uniform(log 1e-3,
    // log 1e-1)) clamped to ≥ 1e-4, dt_bias its inverse softplus. Empty tensors when the checkpoint overwrites them.
    static (Tensor DtBias, Tensor ALog) FlaInit(KimiDeltaAttentionSettings s, Init init)
    {
        if (init.Generator is null) return (init.Zeros(s.Width), init.Zeros(1, 1, s.Heads, 1));
        using var scope = NewDisposeScope();
        var aLog = (rand([1, 1, s.Heads, 1], ScalarType.Float32, generator: init.Generator) * 15 + 1).log();
        var dt = (rand([s.Width], ScalarType.Float32, generator: init.Generator) * (Math.Log(1e-1) - Math.Log(1e-3)) + Math.Log(1e-3)).exp().clamp_min(1e-4);
        var dtBias = dt + (-(-dt).expm1()).log();
        return (dtBias.to(init.DType).to(init.Device).MoveToOuterDisposeScope(), aLog.to(init.DType).to(init.Device).MoveToOuterDisposeScope());
    }

    public Tensor Forward(Tensor x)
    {
        long b = x.shape[0], s = x.shape[1];
        var f = f_b_proj.Forward(f_a_proj.Forward(x));
        var g = (f.to(ScalarType.Float32) + dt_bias.to(ScalarType.Float32).view(1, 1, -1)).view(b, s, -1, _headDim);
        var softplus = where(g > 20.0, g, (g.exp() + 1.0).log());
        return -A_log.to(ScalarType.Float32).exp() * softplus;
    }
}
