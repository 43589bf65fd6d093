using MoeLora.Core.Architectures.Runtime;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// MiniMax-M3's lightning indexer (<see cref="BlockIndexerSettings"/>), as transformers 5.17's eager path runs it
/// (MiniMaxM3VLIndexer.forward, then build_block_mask): per query and indexer head, a score for every key, max-pooled
/// over blocks of key slots; the query's local blocks are forced and the top blocks kept, and each attention head may
/// see only the keys of its indexer head's blocks. Registered q_proj, k_proj, q_norm, k_norm. Unlike
/// <see cref="DsaIndexer"/> (one top-k of keys per query, from relu scores weighted per head) it selects blocks, once
/// per indexer head. The selection is integer-valued, so nothing is differentiated through it (its weights get no
/// gradient in transformers either).
/// </summary>
public sealed class BlockIndexer : HfModule
{
    public Linear q_proj { get; }
    public Linear k_proj { get; }
    readonly RmsNorm _qNorm, _kNorm;
    readonly BlockIndexerSettings _s;
    readonly long _headsPerIndexerHead;

    public BlockIndexer(long hidden, long attentionHeads, BlockIndexerSettings s, Init init)
    {
        if (attentionHeads % s.Heads != 0)
            throw new InvalidDataException($"index_n_heads {s.Heads} does not divide num_attention_heads {attentionHeads}.");
        _s = s;
        _headsPerIndexerHead = attentionHeads / s.Heads;
        q_proj = AddChild("q_proj", new Linear(hidden, s.Heads * s.HeadDim, false, init));
        k_proj = AddChild("k_proj", new Linear(hidden, s.HeadDim, false, init));
        _qNorm = AddChild("q_norm", new RmsNorm(s.HeadDim, s.Norm, init));
        _kNorm = AddChild("k_norm", new RmsNorm(s.HeadDim, s.Norm, init));
    }

    /// <summary>
    /// The additive attention mask [B, 1, S, T] (0 / the dtype's minimum) restricted per attention head to the
    /// selected blocks: [B, heads, S, T], the minimum at every key outside them.
    /// </summary>
    public Tensor Restrict(Tensor x, Tensor mask, Rotary rope, ForwardContext ctx)
    {
        using var _ = no_grad();
        // build_block_mask: indexer head j's selection serves the next heads / index_n_heads query heads.
        var keep = SelectedKeys(x, rope, ctx).repeat_interleave(_headsPerIndexerHead, 1);
        return mask.expand(keep.shape).masked_fill(keep.logical_not(), ForwardContext.MaskMinimum(mask.dtype));
    }

    /// <summary>Which keys each indexer head keeps for each query: [B, index_n_heads, S, T] booleans.</summary>
    Tensor SelectedKeys(Tensor x, Rotary rope, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1], h = _s.Heads, d = _s.HeadDim, size = _s.BlockSize;
        var q = _qNorm.Forward(q_proj.Forward(x).view(b, s, h, d)).transpose(1, 2);      // [B, h, S, d]
        var k = _kNorm.Forward(k_proj.Forward(x).view(b, s, 1, d)).transpose(1, 2);      // [B, 1, T, d]
        (q, k) = Rotate(q, k, rope, ctx);

        // Keys are this forward's token slots (no cache): slot t is after query i when t > position_ids[i]. Padded keys
        // are not excluded here, so they may win a block (as in transformers; the attention mask still hides them).
        long t = s, blocks = (t + size - 1) / size;
        var scores = matmul(q.to(ScalarType.Float32), k.to(ScalarType.Float32).transpose(-1, -2));   // [B, h, S, T]
        var positions = ctx.Positions.unsqueeze(1).unsqueeze(-1);                                      // [B, 1, S, 1]
        var future = arange(t, ScalarType.Int64, x.device).view(1, 1, 1, t).gt(positions);
        scores = scores.masked_fill(future, double.NegativeInfinity);
        if (blocks * size > t) scores = nn.functional.pad(scores, [0, blocks * size - t], value: double.NegativeInfinity);
        var blockScores = scores.view(b, h, s, blocks, size).amax([-1]);                              // [B, h, S, blocks]

        if (_s.LocalBlocks > 0)
        {
            // The query's own block and the local_blocks − 1 before it (clamped at block 0) score +inf: always kept.
            var own = ctx.Positions.div(size, rounding_mode: RoundingMode.floor);                       // [B, S]
            var local = (own.unsqueeze(-1) - arange(_s.LocalBlocks, ScalarType.Int64, x.device).view(1, 1, -1)).clamp_min(0);
            local = local.unsqueeze(1).expand(b, h, s, _s.LocalBlocks);
            blockScores = blockScores.scatter(-1, local, full(local.shape, double.PositiveInfinity, ScalarType.Float32, x.device));
        }

        // A top slot that still scores -inf fell on a block wholly in the future: it selects nothing (transformers
        // tags it -1); send it to an extra column that is dropped.
        var (values, indexes) = blockScores.topk((int)Math.Min(_s.TopKBlocks, blocks), -1);
        var chosen = indexes.masked_fill(values.eq(double.NegativeInfinity), blocks);
        var keepBlocks = zeros(new[] { b, h, s, blocks + 1 }, ScalarType.Bool, x.device)
            .scatter(-1, chosen, ones(chosen.shape, ScalarType.Bool, x.device))[.., .., .., ..(int)blocks];
        return keepBlocks.repeat_interleave(size, -1)[.., .., .., ..(int)t];
    }

    // apply_rotary_pos_emb with the attention's cos/sin cut to the indexer's head_dim: rotate_half pairs the halves of
    // the first min(head_dim, rotary dim) dims but keeps the tables' leading entries, as transformers slices them. The
    // cut tables differ from the attention's, so they are made here rather than taken from the per-forward ones.
    static (Tensor Q, Tensor K) Rotate(Tensor q, Tensor k, Rotary rope, ForwardContext ctx)
    {
        var (cos, sin) = rope.CosSin(ctx.Positions, ctx.DType);
        long rot = Math.Min(q.shape[^1], cos.shape[^1]);
        var rotation = HalfRotation.From(cos[.., .., ..(int)rot], sin[.., .., ..(int)rot]);
        return (rotation.Apply(q), rotation.Apply(k));
    }
}
