using MoeLora.Core.Architectures.Runtime;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>Per-forward state shared by the layers: positions, masks, rotary tables, collected router logits.</summary>
public sealed class ForwardContext
{
    public required Tensor Positions { get; init; }          // [B, S] int64 (0..S-1 when none are given, as HF)
    public required Tensor AttentionMask { get; init; }      // [B, S] int64/bool, 1 = real token
    public required ScalarType DType { get; init; }
    public List<Tensor> RouterLogits { get; } = [];

    /// <summary>The last DSA indexer's top-k keys [B, S, k], which GLM-5's "shared" layers reuse (null: it kept every key).</summary>
    public Tensor? IndexerTopK { get; set; }
    /// <summary>What one layer's router hands to the next (ZAYA's router_hidden_states); null before the first.</summary>
    public Tensor? RouterState { get; set; }
    readonly Dictionary<(MaskKind, long), Tensor> _masks = [];

    /// <summary>
    /// Additive float mask [B, 1, S, S]: 0 where allowed, the dtype's minimum elsewhere (as transformers' eager path).
    /// Fully masked query rows (left padding) then get a uniform, finite softmax; their outputs carry no meaning.
    /// </summary>
    public Tensor Mask(MaskSettings mask) => Mask(mask.Kind, mask.Window);

    public Tensor Mask(MaskKind kind, long window = 0)
    {
        if (_masks.TryGetValue((kind, window), out var m)) return m;
        var q = Positions.unsqueeze(-1);                     // [B, S, 1]
        var k = Positions.unsqueeze(-2);                     // [B, 1, S]
        var allowed = k.le(q) & AttentionMask.to(ScalarType.Bool).unsqueeze(1);
        if (kind == MaskKind.Sliding) allowed &= (q - k).lt(window);
        if (kind == MaskKind.Chunked)
        {
            // transformers' chunked_overlay: chunks are counted from each row's first real token, on sequence indices
            // minus that row's left padding (the leading masked positions), not on position ids.
            var real = AttentionMask.to(ScalarType.Int64);
            var leftPad = real.cumsum(-1, ScalarType.Int64).eq(0).sum(-1, type: ScalarType.Int64);     // [B]
            var chunk = (arange(real.shape[1], ScalarType.Int64, real.device).unsqueeze(0) - leftPad.unsqueeze(-1))
                .div(window, rounding_mode: RoundingMode.floor);                                             // [B, S]
            allowed &= chunk.unsqueeze(-1).eq(chunk.unsqueeze(-2));
        }
        m = where(allowed, 0.0, MaskMinimum(DType)).to(DType).unsqueeze(1);
        _masks[(kind, window)] = m;
        return m;
    }

    /// <summary>The value a masked key gets in <paramref name="dtype"/> (torch.finfo(dtype).min).</summary>
    public static double MaskMinimum(ScalarType dtype) =>
        dtype == ScalarType.Float32 ? float.MinValue : dtype == ScalarType.Float64 ? double.MinValue : -3.3895313892515355e38;
}

public static class AttentionMath
{
    /// <summary>[B, kvHeads, S, d] → [B, kvHeads*nRep, S, d] (each kv head repeated for its query group).</summary>
    public static Tensor RepeatKv(Tensor x, long nRep)
    {
        if (nRep == 1) return x;
        var s = x.shape;
        return x.unsqueeze(2).expand(s[0], s[1], nRep, s[2], s[3]).reshape(s[0], s[1] * nRep, s[2], s[3]);
    }

    /// <summary>
    /// Eager attention: softmax(q k^T * scale + mask) v with the softmax in fp32; optional per-head sinks (gpt-oss)
    /// join the softmax as an extra column that is dropped afterwards. Returns [B, S, heads*dv].
    /// </summary>
    public static Tensor Eager(Tensor q, Tensor k, Tensor v, Tensor mask, double scaling, Tensor? sinks = null, bool softmaxInFp32 = true)
    {
        long groups = q.shape[1] / k.shape[1];
        k = RepeatKv(k, groups);
        v = RepeatKv(v, groups);
        var w = matmul(q, k.transpose(2, 3)) * scaling + mask;
        Tensor probs;
        if (sinks is null)
        {
            probs = softmaxInFp32 ? w.softmax(-1, ScalarType.Float32).to(q.dtype) : w.softmax(-1);
        }
        else
        {
            var s = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1).to(w.dtype);
            var combined = cat([w, s], -1);
            combined = combined - combined.max(-1, keepdim: true).values;
            probs = combined.softmax(-1, combined.dtype)[.., .., .., ..^1];
        }
        var o = matmul(probs, v).transpose(1, 2).contiguous();
        return o.reshape(o.shape[0], o.shape[1], -1);
    }
}
