using MoeLora.Core;
using MoeLora.Core.Architectures.Runtime;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// How attention is computed (transformers' <c>attn_implementation</c>). <see cref="Sdpa"/> (the default) calls
/// torch's scaled_dot_product_attention, which on CUDA runs the flash / memory-efficient kernels and keeps no
/// S × S scores for backward; <see cref="Eager"/> materialises them (matmul + mask + fp32 softmax), as transformers'
/// eager path. Variants SDPA cannot express (gpt-oss's sinks, Doge's dynamic mask) run eagerly under either.
/// </summary>
public enum AttentionImplementation
{
    Sdpa,
    Eager,
}

public static class AttentionImplementations
{
    /// <summary>Environment variable that overrides the default (<c>sdpa</c> or <c>eager</c>), for parity checks.</summary>
    public const string EnvironmentVariable = "MOELORA_ATTN_IMPLEMENTATION";

    public static AttentionImplementation Parse(string s) => s.Trim().ToLowerInvariant() switch
    {
        "sdpa" => AttentionImplementation.Sdpa,
        "eager" => AttentionImplementation.Eager,
        _ => throw new UserInputException($"unknown attention implementation '{s}': use sdpa or eager"),
    };

    /// <summary><see cref="EnvironmentVariable"/> when set, else <see cref="AttentionImplementation.Sdpa"/>.</summary>
    public static AttentionImplementation Default()
    {
        var v = Environment.GetEnvironmentVariable(EnvironmentVariable);
        if (string.IsNullOrWhiteSpace(v)) return AttentionImplementation.Sdpa;
        try { return Parse(v); }
        catch (UserInputException e) { throw new UserInputException($"{EnvironmentVariable}: {e.Message}"); }
    }
}

/// <summary>Per-forward state shared by the layers: positions, masks, rotary tables, collected router logits.</summary>
public sealed class ForwardContext
{
    public required Tensor Positions { get; init; }          // [B, S] int64 (0..S-1 when none are given, as HF)
    public required Tensor AttentionMask { get; init; }      // [B, S] int64/bool, 1 = real token
    public required ScalarType DType { get; init; }
    /// <summary>The token ids [B, S] (DeepSeek-V4's hash routers read them); null where the caller gives none.</summary>
    public Tensor? InputIds { get; init; }
    public AttentionImplementation Attention { get; init; } = AttentionImplementation.Sdpa;
    public List<Tensor> RouterLogits { get; } = [];

    /// <summary>The last DSA indexer's top-k keys [B, S, k], which GLM-5's "shared" layers reuse (null: it kept every key).</summary>
    public Tensor? IndexerTopK { get; set; }
    /// <summary>What one layer's router hands to the next (ZAYA's router_hidden_states); null before the first.</summary>
    public Tensor? RouterState { get; set; }
    readonly Dictionary<(MaskKind, long), Tensor> _masks = [];
    readonly Dictionary<(MaskKind, long), Tensor> _anyKey = [];
    readonly List<(Rotary Rope, ScalarType DType, HalfRotation Tables)> _rotations = [];
    bool? _plainCausal;

    /// <summary>
    /// Every tensor this context holds for later layers (inputs, cached masks, router logits, the indexer's and the
    /// router's hand-over): what <see cref="Models.CausalLm.Forward"/> keeps when it frees a layer's intermediates.
    /// </summary>
    public IEnumerable<Tensor> Held()
    {
        yield return Positions;
        yield return AttentionMask;
        if (InputIds is not null) yield return InputIds;
        foreach (var t in RouterLogits) yield return t;
        foreach (var t in _masks.Values) yield return t;
        foreach (var t in _anyKey.Values) yield return t;
        foreach (var r in _rotations) foreach (var t in r.Tables.Tensors) yield return t;
        if (IndexerTopK is not null) yield return IndexerTopK;
        if (RouterState is not null) yield return RouterState;
    }

    /// <summary>
    /// No padding and positions 0..S-1 in every row: the full mask is then plain causal, and SDPA can take
    /// <c>is_causal</c> without a mask (on CUDA the flash kernel). Checked once per forward (one host sync).
    /// </summary>
    public bool PlainCausal => _plainCausal ??= ComputePlainCausal();

    /// <summary>What <see cref="PlainCausal"/> found, if it was asked (a checkpointed layer's recompute reuses it, sparing the sync).</summary>
    public bool? KnownPlainCausal { get => _plainCausal; init => _plainCausal = value; }

    bool ComputePlainCausal()
    {
        long s = Positions.shape[1];
        var arangeRow = arange(s, ScalarType.Int64, Positions.device).unsqueeze(0);
        return AttentionMask.to(ScalarType.Bool).all().item<bool>() && Positions.eq(arangeRow).all().item<bool>();
    }

    /// <summary>The half-rotation tables of <paramref name="rope"/> in <paramref name="dtype"/> for this forward, made by <paramref name="make"/> once.</summary>
    internal HalfRotation HalfRotation(Rotary rope, ScalarType dtype, Func<HalfRotation> make)
    {
        foreach (var r in _rotations) if (ReferenceEquals(r.Rope, rope) && r.DType == dtype) return r.Tables;
        var tables = make();
        _rotations.Add((rope, dtype, tables));
        return tables;
    }

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

    /// <summary>
    /// [B, S, 1] in the activations' dtype: 1 where the query may see at least one key under <paramref name="mask"/>,
    /// 0 for a query row the mask hides entirely (a left-padded position).
    /// </summary>
    public Tensor SeesAnyKey(MaskSettings mask)
    {
        if (_anyKey.TryGetValue((mask.Kind, mask.Window), out var m)) return m;
        m = Mask(mask).eq(0).any(-1).squeeze(1).unsqueeze(-1).to(DType);
        _anyKey[(mask.Kind, mask.Window)] = m;
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
    /// Attention of q [B, heads, S, d] over k, v [B, kvHeads, S, d·] under the context's mask and implementation:
    /// SDPA unless <see cref="ForwardContext.Attention"/> is eager or the layer has sinks (SDPA has no extra softmax
    /// column). Returns [B, S, heads*dv].
    /// </summary>
    public static Tensor Attend(Tensor q, Tensor k, Tensor v, ForwardContext ctx, MaskSettings mask, double scaling, Tensor? sinks = null, bool softmaxInFp32 = true)
    {
        if (ctx.Attention == AttentionImplementation.Eager || sinks is not null)
            return Eager(q, k, v, ctx.Mask(mask), scaling, sinks, softmaxInFp32);
        return Sdpa(q, k, v, ctx, mask, scaling);
    }

    /// <summary>
    /// <see cref="Attend(Tensor, Tensor, Tensor, ForwardContext, MaskSettings, double, Tensor?, bool)"/> under a mask the
    /// layer built itself (an additive [B, 1 or heads, S, S] mask in eager's convention, e.g. one restricted to selected
    /// keys); the context's own full mask on an unpadded batch still takes SDPA's is_causal path.
    /// </summary>
    public static Tensor Attend(Tensor q, Tensor k, Tensor v, ForwardContext ctx, Tensor additiveMask, double scaling)
    {
        if (ctx.Attention == AttentionImplementation.Eager) return Eager(q, k, v, additiveMask, scaling);
        if (ReferenceEquals(additiveMask, ctx.Mask(MaskKind.Full))) return Sdpa(q, k, v, ctx, new MaskSettings(MaskKind.Full), scaling);
        return SdpaCore(q, k, v, additiveMask, causal: false, scaling);
    }

    /// <summary>
    /// torch's scaled_dot_product_attention. TorchSharp 0.107 exposes neither <c>scale</c> nor <c>enable_gqa</c>: the
    /// causal path without a mask reaches both through <see cref="CausalSdpa"/>; elsewhere kv heads are repeated (as
    /// transformers' sdpa path does without enable_gqa) and q is multiplied by scaling·√d so that SDPA's 1/√d gives the
    /// layer's scaling. With padding, sliding windows or chunks the mask is the same additive one as eager's (the dtype
    /// minimum, not −inf), so real tokens see exactly eager's probabilities and no row is NaN. A query row the mask
    /// hides entirely (left padding) then has its output zeroed: transformers' sdpa path hands torch a boolean mask,
    /// and torch's SDPA (2.5 and later) gives such a row zeros, where eager's finite mask gives the mean of the values.
    /// Real tokens never read padded rows through attention, but MiniMax-M3's block indexer scores padded keys, so
    /// their hidden states reach real tokens there.
    /// SDPA computes its softmax in fp32 on CUDA whatever <c>SoftmaxInFp32</c> asks (transformers' sdpa path too).
    /// </summary>
    public static Tensor Sdpa(Tensor q, Tensor k, Tensor v, ForwardContext ctx, MaskSettings mask, double scaling) =>
        mask.Kind == MaskKind.Full && ctx.PlainCausal
            ? SdpaCore(q, k, v, null, causal: true, scaling)
            : SdpaCore(q, k, v, ctx.Mask(mask), causal: false, scaling) * ctx.SeesAnyKey(mask);

    static Tensor SdpaCore(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, double scaling)
    {
        var o = mask is null && causal && CausalSdpa.Available
            ? CausalSdpa.Run(q, k, v, scaling)
            : RepeatedKvSdpa(q, k, v, mask, causal, scaling);
        o = o.transpose(1, 2).contiguous();
        return o.reshape(o.shape[0], o.shape[1], -1);
    }

    /// <summary>
    /// SDPA through TorchSharp's own binding: kv heads repeated to the query heads, q pre-scaled so that SDPA's 1/√d
    /// gives <paramref name="scaling"/>.
    /// </summary>
    static Tensor RepeatedKvSdpa(Tensor q, Tensor k, Tensor v, Tensor? mask, bool causal, double scaling)
    {
        long groups = q.shape[1] / k.shape[1];
        k = RepeatKv(k, groups);
        v = RepeatKv(v, groups);
        double factor = scaling * Math.Sqrt(q.shape[^1]);
        if (Math.Abs(factor - 1.0) > 1e-12) q = q * factor;
        // SDPA wants a float mask in the query's dtype (eager's addition would promote instead).
        if (mask is not null && mask.dtype != q.dtype) mask = mask.to(q.dtype);
        return nn.functional.scaled_dot_product_attention(q, k, v, mask, is_casual: causal);
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
            // Sinks kept in fp32 (HY-V4) promote the scores to fp32 as torch.cat does; the probabilities go back to v's dtype.
            var dt = sinks.dtype == ScalarType.Float32 ? ScalarType.Float32 : w.dtype;
            var s = sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[2], 1).to(dt);
            var combined = cat([w.to(dt), s], -1);
            combined = combined - combined.max(-1, keepdim: true).values;
            probs = combined.softmax(-1, combined.dtype)[.., .., .., ..^1].to(v.dtype);
        }
        var o = matmul(probs, v).transpose(1, 2).contiguous();
        return o.reshape(o.shape[0], o.shape[1], -1);
    }
}
