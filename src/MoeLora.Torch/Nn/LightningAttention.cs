using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// MiniMax's lightning attention (<see cref="LightningAttentionSettings"/>; transformers' MiniMaxLightningAttention,
/// forward without cache): a linear attention whose state <c>Σ kᵀv</c> decays by <c>exp(−slope)</c> per position and
/// head, computed block by block as transformers does (<see cref="BlockForm"/>), then an RMSNorm over all heads, the
/// sigmoid output gate on the layer input and out_proj.
/// </summary>
public sealed class LightningAttention : HfModule, IBlock
{
    public RmsNorm norm { get; }
    public Linear qkv_proj { get; }
    public Linear out_proj { get; }
    public Linear output_gate { get; }
    readonly Activation _act;
    readonly LightningAttentionSettings _s;
    readonly Tensor _slopeRate, _queryDecay, _keyDecay, _diagonalDecay;

    public LightningAttention(long hidden, LightningAttentionSettings s, Init init)
    {
        _s = s;
        _act = AddChild("act_fn", new Activation(s.Act));
        // MiniMaxRMSNorm(head_dim · heads) is built without the config's epsilon: the class default 1e-6.
        norm = AddChild("norm", new RmsNorm(s.Inner, 1e-6, init));
        qkv_proj = AddChild("qkv_proj", new Linear(hidden, 3 * s.Inner, false, init));
        out_proj = AddChild("out_proj", new Linear(s.Inner, hidden, false, init));
        output_gate = AddChild("output_gate", new Linear(hidden, s.Inner, false, init));
        // Persistent buffers, as transformers registers them: a checkpoint stores them (and may not: they are derived).
        using var slope = SlopeRate(s.Heads, s.LayerIndex, s.NumLayers);
        var (q, k, d) = DecayFactors(slope, s.BlockSize);
        _slopeRate = AddBuffer("slope_rate", slope.to(init.DType).to(init.Device), derived: true);
        _queryDecay = AddBuffer("query_decay", q.to(init.DType).to(init.Device), derived: true);
        _keyDecay = AddBuffer("key_decay", k.to(init.DType).to(init.Device), derived: true);
        _diagonalDecay = AddBuffer("diagonal_decay", d.to(init.DType).to(init.Device), derived: true);
        q.Dispose(); k.Dispose(); d.Dispose();
    }

    /// <summary>
    /// MiniMaxLightningAttention.get_slope_rate: <c>base^(h+1) · (1 − layer / (layers − 1 + 1e-5) + 1e-5)</c> with
    /// <c>base = 2^(−8 / heads)</c>, shaped [heads, 1, 1], in fp32.
    /// </summary>
    internal static Tensor SlopeRate(long heads, int layerIndex, long numLayers)
    {
        double @base = 1 / Math.Pow(2, 8.0 / heads);
        double factor = 1 - layerIndex / (numLayers - 1 + 1e-5) + 1e-5;
        using var exponent = arange(1, heads + 1, ScalarType.Float32);
        using var rate = full([heads], @base, ScalarType.Float32).pow(exponent);
        return (rate * factor).view(heads, 1, 1);
    }

    /// <summary>
    /// MiniMaxLightningAttention.decay_factors for positions j = 1..block: query_decay <c>exp(−s·j)</c>, key_decay
    /// <c>exp(−s·(block − j))</c> (both [heads, block, 1]) and diagonal_decay <c>exp(−s·(i − j))</c> for i ≥ j, 0 above
    /// the diagonal ([1, heads, block, block]).
    /// </summary>
    internal static (Tensor Query, Tensor Key, Tensor Diagonal) DecayFactors(Tensor slope, long blockSize)
    {
        using var scope = NewDisposeScope();
        var range = arange(1, blockSize + 1, ScalarType.Int64, slope.device);
        var query = (-slope * range.unsqueeze(1)).exp();
        var key = (-slope * (blockSize - range.unsqueeze(1))).exp();
        var diff = (range.unsqueeze(1) - range.unsqueeze(0)).unsqueeze(0).unsqueeze(0);
        var scaled = slope * diff;
        var diagonal = where(scaled >= 0, -scaled, full_like(scaled, double.NegativeInfinity)).exp();
        return (query.MoveToOuterDisposeScope(), key.MoveToOuterDisposeScope(), diagonal.MoveToOuterDisposeScope());
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1];
        var qkv = _act.Forward(qkv_proj.Forward(x));
        // apply_mask_to_padding_states: a left-padded row's padding enters as zeros, adds nothing to the state and
        // outputs zero; multiplying an unpadded row by ones changes nothing.
        qkv = ShortConv.MaskPadding(qkv, ctx.AttentionMask);
        var parts = qkv.reshape(b, s, _s.Heads, 3 * _s.HeadDim).split(_s.HeadDim, 3);
        var o = BlockForm(parts[0].transpose(1, 2), parts[1].transpose(1, 2), parts[2].transpose(1, 2),
            _slopeRate, _queryDecay, _keyDecay, _diagonalDecay);
        o = norm.Forward(o.transpose(1, 2).reshape(b, s, _s.Inner));
        return out_proj.Forward(output_gate.Forward(x).sigmoid() * o);
    }

    /// <summary>
    /// The block form of MiniMaxLightningAttention's forward without cache, for q, k, v [B, H, S, D]: in each block
    /// of <c>block</c> positions (the last may be shorter, using the leading query / trailing key decays and the
    /// top-left of the diagonal table), <c>((q kᵀ) ⊙ diagonal) v + (q ⊙ query_decay) S</c>, then
    /// <c>S ← S · exp(−slope · len) + (k ⊙ key_decay)ᵀ v</c>; the state S [B, H, D, D] starts at zero.
    /// </summary>
    internal static Tensor BlockForm(Tensor q, Tensor k, Tensor v, Tensor slopeRate, Tensor queryDecay, Tensor keyDecay, Tensor diagonalDecay)
    {
        long b = q.shape[0], h = q.shape[1], s = q.shape[2], d = q.shape[3], block = queryDecay.shape[1];
        var state = zeros([b, h, d, v.shape[3]], v.dtype, v.device);
        var outputs = new List<Tensor>();
        for (long start = 0; start < s; start += block)
        {
            long len = Math.Min(block, s - start);
            var qb = q.narrow(2, start, len);
            var kb = k.narrow(2, start, len);
            var vb = v.narrow(2, start, len);
            var diagonal = diagonalDecay.narrow(2, 0, len).narrow(3, 0, len);
            // intra: (q kᵀ ⊙ decay) v; inter: (q ⊙ query decay) S.
            var intra = matmul(matmul(qb, kb.transpose(-1, -2)) * diagonal, vb);
            var inter = matmul(qb * queryDecay.narrow(1, 0, len), state);
            outputs.Add(inter + intra);
            var next = matmul((kb * keyDecay.narrow(1, block - len, len)).transpose(-1, -2), vb);
            state = state * (-slopeRate * len).exp() + next;
        }
        return outputs.Count == 1 ? outputs[0] : cat(outputs, -2);
    }
}
