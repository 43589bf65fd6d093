using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// Llama 4's text attention (<see cref="Llama4AttentionSettings"/>): complex rotation of adjacent pairs on rope layers,
/// L2 qk-norm after rope there, attention temperature tuning on no-rope layers, chunked or full masks.
/// </summary>
public sealed class Llama4Attention : HfModule, IBlock
{
    readonly Linear _q, _k, _v, _o;
    readonly bool _useRope, _qkNorm, _temperature;
    readonly long _headDim;
    readonly double _eps, _attnScale, _floorScale;
    readonly MaskSettings _mask;
    readonly Rotary _rope;

    public Llama4Attention(long hidden, Llama4AttentionSettings s, Rotary rope, Init init)
    {
        _headDim = s.HeadDim; _useRope = s.UseRope; _rope = rope; _eps = s.NormEps;
        _q = AddChild("q_proj", new Linear(hidden, s.Heads * _headDim, s.Bias, init));
        _k = AddChild("k_proj", new Linear(hidden, s.KvHeads * _headDim, s.Bias, init));
        _v = AddChild("v_proj", new Linear(hidden, s.KvHeads * _headDim, s.Bias, init));
        _o = AddChild("o_proj", new Linear(s.Heads * _headDim, hidden, s.Bias, init));
        _qkNorm = s.QkL2Norm;
        if (_qkNorm) AddChild("qk_norm", new Container()); // Llama4TextL2Norm: a module without parameters
        _temperature = s.TemperatureTuning;
        _attnScale = s.AttnScale;
        _floorScale = s.FloorScale;
        _mask = s.Mask;
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        long b = x.shape[0], s = x.shape[1];
        var q = _q.Forward(x).view(b, s, -1, _headDim);
        var k = _k.Forward(x).view(b, s, -1, _headDim);
        var v = _v.Forward(x).view(b, s, -1, _headDim).transpose(1, 2);
        if (_useRope)
        {
            var f = _rope.Freqs(ctx.Positions);
            q = Rotary.ApplyComplexPairs(q, f, _rope.AttentionScaling);
            k = Rotary.ApplyComplexPairs(k, f, _rope.AttentionScaling);
        }
        if (_qkNorm) { q = RmsNorm.Normalize(q, _eps); k = RmsNorm.Normalize(k, _eps); }
        if (_temperature)
        {
            var pos = arange(s, ScalarType.Float32, x.device);
            var scales = log1p(floor((pos + 1.0) / _floorScale)) * _attnScale + 1.0;
            q = (q * scales.view(1, s, 1, 1)).to(q.dtype);
        }
        var o = AttentionMath.Attend(q.transpose(1, 2), k.transpose(1, 2), v, ctx, _mask, Math.Pow(_headDim, -0.5));
        return _o.Forward(o);
    }
}

/// <summary>
/// Llama 4's MoE block (<see cref="Llama4RouterSettings"/>): sigmoid of the top-k router logits scales the expert
/// <em>inputs</em>; the shared expert is always added.
/// </summary>
public sealed class Llama4Moe : HfModule, IBlock
{
    readonly Llama4Experts _experts;
    readonly Linear _router;
    readonly GatedMlp _shared;
    readonly int _topK;

    public Llama4Moe(long hidden, MoeSettings s, Init init)
    {
        var r = (Llama4RouterSettings)s.Router;
        var shared = s.Shared ?? throw new NotSupportedException("Llama 4's MoE block always has a shared expert.");
        _topK = (int)r.TopK;
        var experts = new Llama4Experts(s.Experts.NumExperts, hidden, s.Experts.Intermediate, s.Experts.Act, init);
        var router = new Linear(hidden, r.NumExperts, false, init);
        if (s.Order == MoeOrder.ExpertsFirst) { _experts = AddChild("experts", experts); _router = AddChild(r.Name, router); }
        else { _router = AddChild(r.Name, router); _experts = AddChild("experts", experts); }
        _shared = AddChild(shared.Name, new GatedMlp(hidden, shared.Intermediate, shared.Act, init, actName: shared.ActName));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var shape = x.shape;
        var flat = x.reshape(-1, shape[^1]);
        var logits = _router.Forward(flat);
        ctx.RouterLogits.Add(logits);
        var (topV, topIdx) = logits.topk(_topK, 1);
        var scores = nn.functional.sigmoid(topV.to(ScalarType.Float32)).to(topV.dtype);
        var routed = _experts.Forward(flat, topIdx, scores);
        return (_shared.Forward(flat) + routed).view(shape);
    }
}

/// <summary>Llama 4's fused experts: gate_up_proj [E, H, 2I] (gate columns then up), down_proj [E, I, H], used as x·W.</summary>
public sealed class Llama4Experts : ExpertsBase
{
    readonly Activation _act;
    // The layout is (E, in, out), but transformers 5.17's Llama4TextExperts does not declare is_transposed, so PEFT
    // (>= 0.19.1) swaps in/out as for (E, out, in) layouts: lora_A is (r·E, 2I) for gate_up_proj [E, H, 2I].
    // The fixture adapters prove it; we follow PEFT so adapters load and compute identically.
    public override bool IsTransposed => false;

    public Llama4Experts(long experts, long hidden, long intermediate, string act, Init init)
    {
        NumExperts = experts;
        AddParameter("gate_up_proj", init.Normal(experts, hidden, 2 * intermediate));
        AddParameter("down_proj", init.Normal(experts, intermediate, hidden));
        _act = AddChild("act_fn", new Activation(act));
    }

    /// <summary>The routing score scales the expert's input (not its output), as in transformers.</summary>
    public Tensor Forward(Tensor x, Tensor topIdx, Tensor scores)
    {
        return Dispatching == ExpertDispatch.Loop ? ForwardLoop(x, topIdx, scores) : Recomputed(x, topIdx, scores, ForwardGrouped);
    }

    Tensor ForwardGrouped(Tensor x, Grouping g, Tensor scores)
    {
        var w = scores.flatten().index_select(0, g.Order).unsqueeze(-1);
        var h = RunExperts(g, x.index_select(0, g.TokenOf) * w, (ops, xe) =>
        {
            var gu = ops.Mm(xe, "gate_up_proj", transposeWeight: false).chunk(2, -1);
            return ops.Mm(gu[1] * _act.Forward(gu[0]), "down_proj", transposeWeight: false);
        });
        return zeros_like(x).index_add(0, g.TokenOf, h.to(x.dtype), 1.0);
    }

    Tensor ForwardLoop(Tensor x, Tensor topIdx, Tensor scores)
    {
        var gateUp = Effective("gate_up_proj");
        var down = Effective("down_proj");
        var final = zeros_like(x);
        foreach (var (e, tok, slot) in Dispatch(topIdx, NumExperts))
        {
            var w = scores.index(TensorIndex.Tensor(tok), TensorIndex.Tensor(slot)).unsqueeze(-1);
            var cur = x.index_select(0, tok) * w;
            var gu = matmul(cur, gateUp[e]).chunk(2, -1);
            var h = matmul(gu[1] * _act.Forward(gu[0]), down[e]);
            final = final.index_add(0, tok, h.to(final.dtype), 1.0);
        }
        return final;
    }
}
