using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// The DeepSeek sparse attention (DSA) lightning indexer (<see cref="DsaIndexerSettings"/>), as transformers 5.17's
/// eager path computes it (DeepseekV32Indexer.forward, shared by AXK2Indexer; GlmMoeDsaIndexer differs only in rotating
/// interleaved pairs, HYV4Indexer in rotating the last dims, its k_norm eps and applying d^-0.5 to the head weights
/// instead of the scores, the same value since relu commutes with a positive scale): per query, a score for every key, its top-k kept. Registered wq_b, wk, k_norm, weights_proj.
/// Its output is integer indices, so, as in transformers (<c>@torch.no_grad()</c>), nothing is differentiated through it.
/// </summary>
public sealed class DsaIndexer : HfModule
{
    readonly Linear _wqb, _wk, _weights;
    readonly LayerNorm _kNorm;
    readonly DsaIndexerSettings _s;
    readonly long _ropeDim;

    public DsaIndexer(long hidden, long qLoraRank, long ropeDim, DsaIndexerSettings s, Init init)
    {
        if (s.HeadDim < ropeDim) throw new InvalidDataException($"index_head_dim {s.HeadDim} is below qk_rope_head_dim {ropeDim}.");
        _s = s; _ropeDim = ropeDim;
        _wqb = AddChild("wq_b", new Linear(qLoraRank, s.Heads * s.HeadDim, false, init));
        _wk = AddChild("wk", new Linear(hidden, s.HeadDim, false, init));
        var fp32 = s.KeepInFp32 ? init with { DType = ScalarType.Float32 } : init;
        _kNorm = AddChild("k_norm", new LayerNorm(s.HeadDim, s.KNormEps, hasBias: true, fp32));
        _weights = AddChild("weights_proj", new Linear(hidden, s.Heads, false, fp32));
    }

    /// <summary>True when index_topk is at least the <paramref name="keys"/>: every key is selected.</summary>
    public bool KeepsEveryKey(long keys) => _s.TopK >= keys;

    /// <summary>
    /// The selected keys [B, S, min(index_topk, T)] (int64) for attention input <paramref name="x"/> [B, S, H], the
    /// query latent <paramref name="qResid"/> = q_a_layernorm(q_a_proj(x)) [B, S, q_lora_rank] and the additive
    /// attention mask [B, 1, S, T] (0 / the dtype's minimum), which the scores are added to before the top-k.
    /// </summary>
    public Tensor TopK(Tensor x, Tensor qResid, Tensor mask, Rotary rope, ForwardContext ctx)
    {
        using var _ = no_grad();
        long b = x.shape[0], s = x.shape[1], h = _s.Heads, d = _s.HeadDim;
        // q [B, h, S, d] and k [B, 1, S, d]: heads before positions for the shared rope helpers.
        var q = _wqb.Forward(qResid).view(b, s, h, d).transpose(1, 2);
        // HYV4Indexer runs k_norm on wk(x) cast to k_norm's dtype, the result cast back (a no-op for the others).
        var k = _kNorm.Forward(_wk.Forward(x).to(_kNorm.weight.dtype)).to(x.dtype).view(b, 1, s, d);
        q = RotateFirst(q, rope, ctx);
        k = RotateFirst(k, rope, ctx).squeeze(1);                                       // [B, T, d]
        // scores[b, s, h, t] = relu(q·k · d^-0.5), in fp32.
        var scores = matmul(q.transpose(1, 2).to(ScalarType.Float32), k.transpose(-1, -2).to(ScalarType.Float32).unsqueeze(1)) * Math.Pow(d, -0.5);
        scores = nn.functional.relu(scores);
        // Weighted sum over heads: [B, S, 1, h] @ [B, S, h, T] → [B, S, T].
        var weights = _weights.Forward(x.to(_weights.weight.dtype)).to(ScalarType.Float32) * Math.Pow(h, -0.5);
        var index = matmul(weights.unsqueeze(-2), scores).squeeze(-2);
        // The float mask is added, not filled: masked keys score the minimum (plus a vanishing score), as in transformers.
        index = index + mask.select(1, 0).to(ScalarType.Float32);
        var keep = Math.Min(_s.TopK, index.shape[^1]);
        return index.topk((int)keep, -1).indexes;
    }

    /// <summary>
    /// The attention mask restricted to <paramref name="topK"/>: the dtype's minimum at every key not selected
    /// (<c>attention_mask.masked_fill(index_mask, finfo.min)</c>).
    /// </summary>
    public static Tensor Restrict(Tensor mask, Tensor topK)
    {
        long b = mask.shape[0], s = mask.shape[2], t = mask.shape[3];
        var notSelected = ones(new[] { b, s, t }, ScalarType.Bool, mask.device)
            .scatter(-1, topK, zeros(topK.shape, ScalarType.Bool, mask.device)).unsqueeze(1);
        return mask.masked_fill(notSelected, ForwardContext.MaskMinimum(mask.dtype));
    }

    // Rope on the first qk_rope_head_dim dims of each indexer head (transformers splits rot, then pass), or on the last
    // ones (HYV4Indexer splits pass, then rot).
    Tensor RotateFirst(Tensor x, Rotary rope, ForwardContext ctx)
    {
        long pass = x.shape[^1] - _ropeDim;
        var parts = _s.RopeOnLast ? x.split([pass, _ropeDim], -1) : x.split([_ropeDim, pass], -1);
        var rot = parts[_s.RopeOnLast ? 1 : 0];
        var (cos, sin) = rope.CosSin(ctx.Positions, ctx.DType);
        var rotated = _s.InterleavedRope ? Rotary.ApplyInterleaved(rot, cos, sin) : Rotary.ApplyHalf(rot, cos, sin);
        return _s.RopeOnLast ? cat([parts[0], rotated], -1) : cat([rotated, parts[1]], -1);
    }
}
