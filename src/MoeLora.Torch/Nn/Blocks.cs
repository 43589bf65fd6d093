using MoeLora.Core.Architectures.Runtime;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

public interface IBlock
{
    Tensor Forward(Tensor x, ForwardContext ctx);
}

/// <summary>A decoder layer: residual stream in, residual stream out.</summary>
public interface IDecoderLayer
{
    Tensor Forward(Tensor x, ForwardContext ctx);
}

/// <summary>Pre-norm decoder layer: h = x + attn(norm1(x)); out = h + ff(norm2(h)).</summary>
public sealed class DecoderLayer : HfModule, IDecoderLayer
{
    readonly IBlock _attn, _ff;
    readonly RmsNorm _ln1, _ln2;

    /// <param name="ffName">"mlp" for most families, "feed_forward" for Llama4.</param>
    public DecoderLayer(HfModule attn, string ffName, HfModule ff, RmsNorm inputNorm, RmsNorm postNorm)
    {
        _attn = (IBlock)AddChild("self_attn", attn);
        _ff = (IBlock)AddChild(ffName, ff);
        _ln1 = AddChild("input_layernorm", inputNorm);
        _ln2 = AddChild("post_attention_layernorm", postNorm);
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var h = x + _attn.Forward(_ln1.Forward(x), ctx);
        return h + _ff.Forward(_ln2.Forward(h), ctx);
    }
}

/// <summary>
/// Standard GQA self-attention (<see cref="StandardAttentionSettings"/>: Llama, Qwen, Mixtral, OLMoE, GLM-4.5, gpt-oss):
/// q/k/v/o projections, optional q/k RMSNorm (per head or over the whole projection), rotary by rotating halves on
/// the first RotaryDim dims of each head, causal/sliding mask and optional attention sinks (a direct parameter
/// registered first); <see cref="StandardAttentionOptions"/> add the variants of the other families (interleaved-pair
/// or no rotation, q/k norms after rope or under other names and kinds, value head size and scale, softmax scale and
/// dtype, an output gate, or one carried by q_proj, MiniMax-M3's block indexer). The rotary table is the layer's own when the options give one (built by ModelBuilder).
/// </summary>
public sealed class StandardAttention : HfModule, IBlock
{
    public Linear q_proj { get; }
    public Linear k_proj { get; }
    public Linear v_proj { get; }
    public Linear o_proj { get; }
    readonly RmsNorm? _qNorm, _kNorm;
    readonly Linear? _gate;
    readonly Parameter? _sinks;
    readonly BlockIndexer? _indexer;
    readonly StandardAttentionSettings _s;
    readonly StandardAttentionOptions _o;
    readonly long _vDim;
    readonly Rotary _rope;

    public StandardAttention(long hidden, StandardAttentionSettings s, Rotary rope, Init init)
    {
        _s = s; _rope = rope;
        _o = s.Options ?? new StandardAttentionOptions();
        _vDim = _o.VHeadDim ?? s.HeadDim;
        if (s.Sinks) _sinks = AddParameter("sinks", init.Normal(s.Heads));
        q_proj = AddChild("q_proj", new Linear(hidden, s.Heads * s.HeadDim * (_o.GateInQuery ? 2 : 1), s.QkvBias, init));
        k_proj = AddChild("k_proj", new Linear(hidden, s.KvHeads * s.HeadDim, s.QkvBias, init));
        v_proj = AddChild("v_proj", new Linear(hidden, s.KvHeads * _vDim, s.QkvBias, init));
        o_proj = AddChild(_o.OName, new Linear(s.Heads * _vDim, hidden, s.OBias, init));
        var qk = new NormSettings(_o.QkNormType, s.QkNormEps);
        if (s.QkNorm == QkNormKind.PerHead)
        {
            _qNorm = AddChild(_o.QNormName, new RmsNorm(s.HeadDim, qk, init));
            _kNorm = AddChild(_o.KNormName, new RmsNorm(s.HeadDim, qk, init));
        }
        else if (s.QkNorm == QkNormKind.Full)
        {
            _qNorm = AddChild(_o.QNormName, new RmsNorm(s.Heads * s.HeadDim, qk, init));
            _kNorm = AddChild(_o.KNormName, new RmsNorm(s.KvHeads * s.HeadDim, qk, init));
        }
        if (_o.Gate is { } g) _gate = AddChild(g.Name, new Linear(hidden, g.PerHead ? s.Heads : s.Heads * _vDim, false, init));
        if (_o.BlockIndexer is { } ix)
        {
            // The restricted mask goes through the plain (fp32-softmax, sink-free) attention.
            if (s.Sinks || !_o.SoftmaxInFp32) throw new NotSupportedException("a block indexer with attention sinks or a non-fp32 softmax has no runtime block.");
            _indexer = AddChild("indexer", new BlockIndexer(hidden, s.Heads, ix, init));
        }
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1], d = _s.HeadDim;
        var q = q_proj.Forward(x);
        Tensor? queryGate = null;
        if (_o.GateInQuery)
        {
            // Per head: head_dim query outputs, then head_dim gate outputs.
            var halves = q.view(b, s, -1, 2 * d).chunk(2, -1);
            q = halves[0];
            queryGate = halves[1].reshape(b, s, -1);
        }
        var k = k_proj.Forward(x);
        var v = v_proj.Forward(x);
        if (_s.QkNorm == QkNormKind.Full) { q = _qNorm!.Forward(q); k = _kNorm!.Forward(k); }
        q = q.reshape(b, s, -1, d);
        k = k.view(b, s, -1, d);
        bool normAfterRope = _o.QkNormAfterRope && _s.QkNorm == QkNormKind.PerHead;
        if (_s.QkNorm == QkNormKind.PerHead && !normAfterRope) { q = _qNorm!.Forward(q); k = _kNorm!.Forward(k); }
        q = q.transpose(1, 2); k = k.transpose(1, 2);
        v = v.view(b, s, -1, _vDim).transpose(1, 2);
        if (_o.ValueScale != 1.0) v = v * _o.ValueScale;
        if (_o.Rotary == RotaryStyle.Half)
        {
            var rotation = _rope.Half(ctx, ctx.DType);
            q = rotation.Apply(q);
            k = rotation.Apply(k);
        }
        else if (_o.Rotary == RotaryStyle.InterleavedPairs)
        {
            var (cos, sin) = _rope.CosSin(ctx.Positions, _o.RopeTablesInFp32 ? ScalarType.Float32 : ctx.DType);
            q = Rotary.ApplyInterleavedPairs(q, cos, sin);
            k = Rotary.ApplyInterleavedPairs(k, cos, sin);
        }
        if (normAfterRope) { q = _qNorm!.Forward(q); k = _kNorm!.Forward(k); }
        var scaling = _o.Scaling ?? Math.Pow(d, -0.5);
        // MiniMax-M3's sparse layers: the indexer, fed the attention's input, limits each head to its selected key blocks.
        var o = _indexer is null ? AttentionMath.Attend(q, k, v, ctx, _s.Mask, scaling, _sinks, _o.SoftmaxInFp32)
            : AttentionMath.Attend(q, k, v, ctx, _indexer.Restrict(x, ctx.Mask(_s.Mask), _rope, ctx), scaling);
        if (_gate is not null) o = Gate(o, x);
        if (queryGate is not null) o = o * nn.functional.sigmoid(queryGate);
        return o_proj.Forward(o);
    }

    /// <summary>The attention output [B, S, heads·v] times its gate's weights (per element or per head): AFMoE, Laguna.</summary>
    Tensor Gate(Tensor o, Tensor x)
    {
        var g = _gate!.Forward(x);
        g = _o.Gate!.Kind switch
        {
            OutputGateKind.Sigmoid => nn.functional.sigmoid(g),
            OutputGateKind.Softplus => nn.functional.softplus(g.to(ScalarType.Float32)).to(o.dtype),
            _ => throw new NotSupportedException($"output gate {_o.Gate.Kind} has no runtime block."),
        };
        if (!_o.Gate.PerHead) return o * g;
        var sh = o.shape;
        return (o.view(sh[0], sh[1], -1, _vDim) * g.unsqueeze(-1)).view(sh[0], sh[1], -1);
    }
}
