using MoeLora.Torch.Nn;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Models.Families;

/// <summary>
/// llama4_text (Llama4ForCausalLM): MoE on <c>moe_layers</c>; rope as complex rotation of adjacent pairs on
/// <c>no_rope_layers[i]</c>=1 layers, L2 qk-norm after rope there (<c>use_qk_norm</c>), attention temperature tuning
/// on no-rope layers, chunked attention masks; router = sigmoid of the top-k logits, applied to the expert
/// <em>inputs</em>; a shared expert is always added; (E, in, out) experts with gate/up as the two halves.
/// </summary>
internal sealed class Llama4Text : IModelFamily
{
    public string ModelType => "llama4_text";

    public CausalLm Build(ModelConfig c, Init init)
    {
        var rope = Rotary.FromConfig(c, c.HeadDim);
        long layers = c.NumLayers;
        long interval = c.LongOr("no_rope_layer_interval", 4);
        var noRope = c.LongArrayOr("no_rope_layers", Enumerable.Range(0, (int)layers).Select(i => (i + 1) % interval != 0 ? 1L : 0L).ToArray());
        long step = c.LongOr("interleave_moe_layer_step", 1);
        var moeLayers = c.LongArrayOr("moe_layers", Enumerable.Range(0, (int)layers).Select(i => (long)i).Where(i => i % step == step - 1).ToArray());
        var types = c.StrArray("layer_types") ?? noRope.Select(r => r != 0 ? "chunked_attention" : "full_attention").ToArray();
        return new CausalLm(c, init, i =>
        {
            HfModule ff = moeLayers.Contains(i)
                ? new Llama4Moe(c, init)
                : new GatedMlp(c.HiddenSize, c.Long("intermediate_size_mlp"), c.HiddenAct, init, actName: "activation_fn");
            return new DecoderLayer(new Llama4Attention(c, i, noRope[i] != 0, types[i], rope, init), "feed_forward", ff,
                new RmsNorm(c.HiddenSize, c.RmsEps, init), new RmsNorm(c.HiddenSize, c.RmsEps, init));
        }, new RmsNorm(c.HiddenSize, c.RmsEps, init));
    }
}

internal sealed class Llama4Attention : HfModule, IBlock
{
    readonly Linear _q, _k, _v, _o;
    readonly bool _useRope, _qkNorm, _temperature;
    readonly long _headDim;
    readonly double _eps, _attnScale, _floorScale;
    readonly MaskKind _mask;
    readonly long _chunk;
    readonly Rotary _rope;

    public Llama4Attention(ModelConfig c, int layer, bool useRope, string layerType, Rotary rope, Init init)
    {
        _headDim = c.HeadDim; _useRope = useRope; _rope = rope; _eps = c.RmsEps;
        bool bias = c.BoolOr("attention_bias", false);
        _q = AddChild("q_proj", new Linear(c.HiddenSize, c.NumHeads * _headDim, bias, init));
        _k = AddChild("k_proj", new Linear(c.HiddenSize, c.NumKvHeads * _headDim, bias, init));
        _v = AddChild("v_proj", new Linear(c.HiddenSize, c.NumKvHeads * _headDim, bias, init));
        _o = AddChild("o_proj", new Linear(c.NumHeads * _headDim, c.HiddenSize, bias, init));
        _qkNorm = c.BoolOr("use_qk_norm", true) && useRope;
        if (_qkNorm) AddChild("qk_norm", new Container()); // Llama4TextL2Norm: a module without parameters
        _temperature = c.BoolOr("attn_temperature_tuning", true) && !useRope;
        _attnScale = c.DoubleOr("attn_scale", 0.1);
        _floorScale = c.DoubleOr("floor_scale", 8192);
        _mask = layerType == "chunked_attention" ? MaskKind.Chunked : MaskKind.Full;
        _chunk = c.LongOr("attention_chunk_size", 8192);
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
        var o = AttentionMath.Eager(q.transpose(1, 2), k.transpose(1, 2), v, ctx.Mask(_mask, _chunk), Math.Pow(_headDim, -0.5));
        return _o.Forward(o);
    }
}

internal sealed class Llama4Moe : HfModule, IBlock
{
    readonly Llama4Experts _experts;
    readonly Linear _router;
    readonly GatedMlp _shared;
    readonly int _topK;

    public Llama4Moe(ModelConfig c, Init init)
    {
        long e = c.Long("num_local_experts"), inter = c.Long("intermediate_size");
        _topK = (int)c.Long("num_experts_per_tok");
        _experts = AddChild("experts", new Llama4Experts(e, c.HiddenSize, inter, c.HiddenAct, init));
        _router = AddChild("router", new Linear(c.HiddenSize, e, false, init));
        _shared = AddChild("shared_expert", new GatedMlp(c.HiddenSize, inter, c.HiddenAct, init, actName: "activation_fn"));
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

internal sealed class Llama4Experts : ExpertsBase
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
        if (Dispatching == ExpertDispatch.Loop) return ForwardLoop(x, topIdx, scores);
        var g = Group(topIdx);
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
