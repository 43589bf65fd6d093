using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// Gated DeltaNet linear attention (<see cref="GatedDeltaNetSettings"/>: Qwen3-Next, Qwen3.5), as transformers'
/// torch fallback computes a full forward without cache: in-projections, a causal depthwise convolution over q|k|v
/// with its activation, β = sigmoid(b), g = −exp(A_log)·softplus(a + dt_bias), the chunked gated delta rule
/// (<see cref="GatedDeltaRule"/>), the gated RMSNorm with silu(z) and out_proj.
/// </summary>
public sealed class GatedDeltaNet : HfModule, IBlock
{
    public Parameter dt_bias { get; }
    public Parameter A_log { get; }
    public DepthwiseConv1d conv1d { get; }
    public RmsNormGated norm { get; }
    public Linear out_proj { get; }
    // Qwen3-Next's fused projections, or Qwen3.5's split ones.
    readonly Linear? _qkvz, _ba, _qkv, _z, _b, _a;
    readonly GatedDeltaNetSettings _s;
    readonly Activation _convAct;

    public GatedDeltaNet(long hidden, GatedDeltaNetSettings s, Init init)
    {
        _s = s;
        long keyDim = s.KeyHeads * s.KeyHeadDim, valueDim = s.ValueHeads * s.ValueHeadDim;
        if (s.ValueHeads % s.KeyHeads != 0)
            throw new InvalidDataException($"linear_num_value_heads ({s.ValueHeads}) must be a multiple of linear_num_key_heads ({s.KeyHeads}).");
        // transformers' _init_weights: dt_bias ones, A_log = log(uniform(0.01, 16)) (the lower bound keeps log finite).
        dt_bias = AddParameter("dt_bias", init.Ones(s.ValueHeads));
        A_log = AddParameter("A_log", LogUniform(s.ValueHeads, init));
        conv1d = AddChild("conv1d", new DepthwiseConv1d(s.ConvDim, s.ConvKernel, init));
        if (s.Projections == DeltaNetProjections.FusedQkvzBa)
        {
            _qkvz = AddChild("in_proj_qkvz", new Linear(hidden, 2 * keyDim + 2 * valueDim, false, init));
            _ba = AddChild("in_proj_ba", new Linear(hidden, 2 * s.ValueHeads, false, init));
        }
        norm = AddChild("norm", new RmsNormGated(s.ValueHeadDim, s.NormEps, init));
        out_proj = AddChild("out_proj", new Linear(valueDim, hidden, false, init));
        if (s.Projections == DeltaNetProjections.Split)
        {
            _qkv = AddChild("in_proj_qkv", new Linear(hidden, 2 * keyDim + valueDim, false, init));
            _z = AddChild("in_proj_z", new Linear(hidden, valueDim, false, init));
            _b = AddChild("in_proj_b", new Linear(hidden, s.ValueHeads, false, init));
            _a = AddChild("in_proj_a", new Linear(hidden, s.ValueHeads, false, init));
        }
        _convAct = new Activation(s.ConvAct);
    }

    static Tensor LogUniform(long n, Init init)
    {
        if (init.Generator is null) return init.Zeros(n); // overwritten by the checkpoint
        using var u = rand([n], ScalarType.Float32, generator: init.Generator);
        using var a = (u * (16.0 - 0.01) + 0.01).log();
        return a.to(init.DType).to(init.Device);
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1];
        // Left padding: padded positions enter as zeros, so (no bias anywhere) they leave the recurrent state at zero
        // and the real tokens see exactly the unpadded row. Multiplying an unpadded row by ones changes nothing.
        x = (x * ctx.AttentionMask.unsqueeze(-1).to(x.dtype)).to(x.dtype);

        var (mixedQkv, z, beta, a) = Project(x);
        var conv = _convAct.Forward(conv1d.Causal(mixedQkv.transpose(1, 2))).transpose(1, 2);
        long keyDim = _s.KeyHeads * _s.KeyHeadDim, valueDim = _s.ValueHeads * _s.ValueHeadDim;
        var parts = conv.split([keyDim, keyDim, valueDim], -1);
        var q = parts[0].reshape(b, s, -1, _s.KeyHeadDim);
        var k = parts[1].reshape(b, s, -1, _s.KeyHeadDim);
        var v = parts[2].reshape(b, s, -1, _s.ValueHeadDim);

        beta = beta.sigmoid();
        // In fp32: A_log.exp() of a half-precision model could overflow.
        var g = -A_log.to(ScalarType.Float32).exp() * nn.functional.softplus(a.to(ScalarType.Float32) + dt_bias);

        var core = GatedDeltaRule.Chunked(q, k, v, g, beta);                                  // [B, S, Hv, dv]
        var normed = norm.Forward(core.reshape(-1, _s.ValueHeadDim), z.reshape(-1, _s.ValueHeadDim));
        return out_proj.Forward(normed.reshape(b, s, -1));
    }

    /// <summary>q|k|v for the convolution [B, S, conv dim], z [B, S, Hv, dv], β's logit b and a [B, S, Hv].</summary>
    (Tensor MixedQkv, Tensor Z, Tensor B, Tensor A) Project(Tensor x)
    {
        long b = x.shape[0], s = x.shape[1];
        if (_s.Projections == DeltaNetProjections.Split)
            return (_qkv!.Forward(x), _z!.Forward(x).reshape(b, s, -1, _s.ValueHeadDim), _b!.Forward(x), _a!.Forward(x));

        // Qwen3-Next groups its outputs per key head: [q, k, v·r, z·r] and [b·r, a·r] with r value heads per key head.
        long r = _s.ValueHeads / _s.KeyHeads, dk = _s.KeyHeadDim, dv = _s.ValueHeadDim;
        var qkvz = _qkvz!.Forward(x).view(b, s, _s.KeyHeads, 2 * dk + 2 * r * dv).split([dk, dk, r * dv, r * dv], -1);
        var ba = _ba!.Forward(x).view(b, s, _s.KeyHeads, 2 * r).split([r, r], -1);
        var mixed = cat([qkvz[0].reshape(b, s, -1), qkvz[1].reshape(b, s, -1), qkvz[2].reshape(b, s, -1)], -1);
        return (mixed, qkvz[3].reshape(b, s, -1, dv), ba[0].reshape(b, s, _s.ValueHeads), ba[1].reshape(b, s, _s.ValueHeads));
    }
}

/// <summary>
/// A depthwise <c>nn.Conv1d</c> (weight [C, 1, K], a bias [C] where the family has one: LFM2's conv_bias, Mamba-2's
/// use_conv_bias; Gated DeltaNet has none), or a grouped one (weight [C, C / groups, K]: ZAYA's conv_qk_grouped), used
/// causally: padded by K − 1 on both sides and cut to the first S outputs, so position t sees inputs t − K + 1 … t;
/// or without padding (<see cref="Valid"/>). Never a LoRA target here (Core's tree marks it as a module PEFT does not wrap).
/// </summary>
public sealed class DepthwiseConv1d : HfModule
{
    public Parameter weight { get; }
    public Parameter? bias { get; }

    /// <param name="groups">The convolution's groups; 0: one per channel (depthwise).</param>
    public DepthwiseConv1d(long channels, long kernel, Init init, bool hasBias = false, long groups = 0)
    {
        weight = AddParameter("weight", init.Normal(channels, groups == 0 ? 1 : channels / groups, kernel));
        if (hasBias) bias = AddParameter("bias", init.Zeros(channels));
        _groups = groups == 0 ? channels : groups;
    }

    readonly long _groups;

    /// <summary>x [B, C, S] → [B, C, S − K + 1] (<c>padding=0</c>), in the input's dtype.</summary>
    public Tensor Valid(Tensor x) =>
        nn.functional.conv1d(x.to(weight.dtype), weight, bias, stride: 1, padding: 0, dilation: 1, groups: _groups).to(x.dtype);

    /// <summary>x [B, C, S] → [B, C, S], in the input's dtype.</summary>
    public Tensor Causal(Tensor x)
    {
        long s = x.shape[2], k = weight.shape[2];
        var y = nn.functional.conv1d(x.to(weight.dtype), weight, bias, stride: 1, padding: k - 1, dilation: 1, groups: _groups);
        return y.narrow(2, 0, s).to(x.dtype);
    }
}

/// <summary>
/// transformers' gated RMSNorms. <c>Qwen3NextRMSNormGated</c>: RMS statistics in fp32, cast back, times the weight,
/// then times silu(gate) computed in fp32, cast back last. <c>KimiLinearRMSNormGated</c>
/// (<paramref name="sigmoidInFp32"/>): the statistics, the weight and sigmoid(gate) all in fp32, cast back last. The
/// weight starts at one.
/// </summary>
public sealed class RmsNormGated : HfModule
{
    public Parameter weight { get; }
    readonly double _eps;
    readonly bool _sigmoidInFp32;

    public RmsNormGated(long size, double eps, Init init, bool sigmoidInFp32 = false)
    {
        _eps = eps; _sigmoidInFp32 = sigmoidInFp32;
        weight = AddParameter("weight", init.Ones(size));
    }

    public Tensor Forward(Tensor x, Tensor gate)
    {
        var dt = x.dtype;
        var h = x.to(ScalarType.Float32);
        h = h * rsqrt(h.pow(2).mean([-1], keepdim: true) + _eps);
        if (_sigmoidInFp32) return (weight.to(ScalarType.Float32) * h * nn.functional.sigmoid(gate.to(ScalarType.Float32))).to(dt);
        var scaled = weight * h.to(dt);
        return (scaled * nn.functional.silu(gate.to(ScalarType.Float32))).to(dt);
    }
}

/// <summary>
/// The gated delta rule over a whole sequence from a zero state, in fp32, as transformers'
/// <c>torch_chunk_gated_delta_rule</c> (Gated DeltaNet: one decay per head and token) and
/// <c>chunk_kimi_delta_attention</c> (Kimi delta attention: one decay per key channel) compute it, in chunks of 64.
/// Per value head, with l2-normed q and k and q scaled by dk^-½, the recurrence is S_t = D_t·S_{t−1} +
/// k_t (β_t (v_t − (D_t·S_{t−1})ᵀ k_t))ᵀ and o_t = S_tᵀ q_t, D_t = diag(exp(g_t)) over the key dims (a scalar for
/// Gated DeltaNet). Inside a chunk the updates are solved at once through the unit lower-triangular system (I + L)
/// with L the strictly lower part of β k kᵀ weighted by the decay between the two positions (per channel: see
/// <see cref="DecayedPerChannel"/>); chunks are then scanned in order.
/// </summary>
public static class GatedDeltaRule
{
    const long ChunkSize = 64;

    /// <summary>
    /// q, k [B, S, Hk, dk], v [B, S, Hv, dv], β [B, S, Hv], g [B, S, Hv] (per head) or [B, S, Hv, dk] (per key channel)
    /// → [B, S, Hv, dv] in q's dtype.
    /// </summary>
    public static Tensor Chunked(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta)
    {
        var dtype = q.dtype;
        long b = v.shape[0], s = v.shape[1], heads = v.shape[2], dv = v.shape[3], dk = k.shape[3];
        bool perChannel = g.dim() == 4;
        // Each key head serves heads / Hk consecutive value heads.
        if (k.shape[2] != heads)
        {
            q = q.repeat_interleave(heads / q.shape[2], 2);
            k = k.repeat_interleave(heads / k.shape[2], 2);
        }
        static Tensor HeadsFirst(Tensor t) => t.transpose(1, 2).to(ScalarType.Float32).contiguous();
        q = L2Norm(HeadsFirst(q)) * Math.Pow(dk, -0.5);
        k = L2Norm(HeadsFirst(k));
        v = HeadsFirst(v);
        beta = HeadsFirst(beta);
        g = HeadsFirst(perChannel ? g : g.unsqueeze(-1));                                      // [B, H, S, 1 or dk]

        long pad = (ChunkSize - s % ChunkSize) % ChunkSize, n = (s + pad) / ChunkSize;
        if (pad > 0)
        {
            // Trailing zeros: β = 0 writes nothing to the state and g = 0 does not decay it.
            q = nn.functional.pad(q, [0, 0, 0, pad]);
            k = nn.functional.pad(k, [0, 0, 0, pad]);
            v = nn.functional.pad(v, [0, 0, 0, pad]);
            beta = nn.functional.pad(beta, [0, pad]);
            g = nn.functional.pad(g, [0, 0, 0, pad]);
        }
        Tensor Chunks(Tensor t) => t.reshape(b, heads, n, ChunkSize, t.shape[^1]);
        var vBeta = Chunks(v * beta.unsqueeze(-1));
        var kBeta = Chunks(k * beta.unsqueeze(-1));
        q = Chunks(q);
        k = Chunks(k);
        var cum = Chunks(g).cumsum(-2);                                                         // log decay since chunk start

        // The pairwise weights of position i on j ≤ i inside a chunk, Σ_d a_i,d b_j,d exp(cum_i,d − cum_j,d) (0 above
        // the diagonal); with one decay per head the exponential factors out of the sum and this is a matmul.
        var above = ones(ChunkSize, ChunkSize, ScalarType.Bool, q.device).triu(1);
        Tensor Decayed(Tensor a, Tensor bt)
        {
            if (!perChannel)
            {
                var c = cum.squeeze(-1);
                return matmul(a, bt.transpose(-1, -2)) * (c.unsqueeze(-1) - c.unsqueeze(-2)).masked_fill(above, double.NegativeInfinity).exp();
            }
            return DecayedPerChannel(a, bt, cum);
        }
        var system = Decayed(kBeta, k);                                                          // its diagonal is taken as 1
        var intra = Decayed(q, k);
        var newValues = linalg.solve_triangular(system, vBeta, upper: false, unitriangular: true);
        var kCumDecay = linalg.solve_triangular(system, kBeta * cum.exp(), upper: false, unitriangular: true);

        var qDecayed = q * cum.exp();
        var last = cum.narrow(-2, ChunkSize - 1, 1);                                           // [B, H, N, 1, 1 or dk]
        var kToEnd = k * (last - cum).exp();
        var chunkDecay = last.exp().transpose(-1, -2);                                          // [B, H, N, 1 or dk, 1]

        var state = zeros([b, heads, dk, dv], ScalarType.Float32, q.device);
        var outs = new Tensor[n];
        for (long i = 0; i < n; i++)
        {
            var vNew = newValues.select(2, i) - matmul(kCumDecay.select(2, i), state);
            outs[i] = matmul(qDecayed.select(2, i), state) + matmul(intra.select(2, i), vNew);
            state = state * chunkDecay.select(2, i) + matmul(kToEnd.select(2, i).transpose(-1, -2), vNew);
        }
        var o = stack(outs, 2).reshape(b, heads, -1, dv).narrow(2, 0, s);
        return o.transpose(1, 2).contiguous().to(dtype);
    }

    const long SubChunk = 16;

    /// <summary>
    /// Σ_d a_i,d b_j,d exp(cum_i,d − cum_j,d) for j ≤ i (0 above the diagonal) with one decay per channel: a, b, cum
    /// [.., C, dk] → [.., C, C]. transformers' chunk_kimi_delta_attention forms the whole [C, C, dk] decay tensor; the
    /// factored form exp(cum_i)·exp(−cum_j) would overflow for strong decays. Here, as the FLA kernels do, rows come in
    /// sub-chunks of 16: pairs inside one use the explicit [16, 16, dk] decays; an earlier column j meets row i through
    /// the sub-chunk's first position r, exp(cum_i − cum_r)·exp(cum_r − cum_j), both exponents ≤ 0 (cum never rises),
    /// so it is one matmul and nothing overflows. The decay tensors kept for backward shrink by C / 16.
    /// </summary>
    static Tensor DecayedPerChannel(Tensor a, Tensor bt, Tensor cum)
    {
        long c = a.shape[^2], sub = Math.Min(SubChunk, c), blocks = c / sub;
        var above = ones(sub, sub, ScalarType.Bool, a.device).triu(1).unsqueeze(-1);
        var rows = new Tensor[blocks];
        for (long s = 0; s < blocks; s++)
        {
            long start = s * sub;
            var ai = a.narrow(-2, start, sub);
            var ci = cum.narrow(-2, start, sub);
            var decay = (ci.unsqueeze(-2) - ci.unsqueeze(-3)).masked_fill(above, double.NegativeInfinity).exp();
            var diagonal = (ai.unsqueeze(-2) * bt.narrow(-2, start, sub).unsqueeze(-3) * decay).sum(-1);     // [.., sub, sub]
            var parts = new List<Tensor>();
            if (start > 0)
            {
                var reference = cum.narrow(-2, start, 1);                                                    // [.., 1, dk]
                var earlier = bt.narrow(-2, 0, start) * (reference - cum.narrow(-2, 0, start)).exp();
                parts.Add(matmul(ai * (ci - reference).exp(), earlier.transpose(-1, -2)));                    // [.., sub, start]
            }
            parts.Add(diagonal);
            if (start + sub < c) parts.Add(zeros([.. diagonal.shape[..^1], c - start - sub], diagonal.dtype, diagonal.device));
            rows[s] = parts.Count == 1 ? parts[0] : cat(parts, -1);
        }
        return cat(rows, -2);
    }

    /// <summary>x / sqrt(Σx² + 1e-6) over the last dimension (the FLA library's l2norm, as transformers uses it).</summary>
    static Tensor L2Norm(Tensor x) => x * rsqrt((x * x).sum(-1, keepdim: true) + 1e-6);
}
