using MoeLora.Torch.Nn;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Models.Families;

/// <summary>
/// gpt_oss: attention with biases and per-head sinks, sliding-window layers (<c>layer_types</c>), yarn rope;
/// router with bias, softmax over the top-k logits; biased (E, in, out) experts with interleaved gate/up columns and
/// the clamped SwiGLU <c>(clamp(up,±L)+1) * g*sigmoid(1.702 g)</c>, g = clamp(gate, max=L).
/// </summary>
internal sealed class GptOss : IModelFamily
{
    public string ModelType => "gpt_oss";

    public CausalLm Build(ModelConfig c, Init init)
    {
        var rope = Rotary.FromConfig(c, c.HeadDim);
        var bias = c.BoolOr("attention_bias", true);
        var types = c.StrArray("layer_types") ?? Enumerable.Range(0, (int)c.NumLayers).Select(i => i % 2 == 0 ? "sliding_attention" : "full_attention").ToArray();
        long window = c.LongOrNull("sliding_window") ?? 128;
        return new CausalLm(c, init, i =>
        {
            var kind = types[i] == "sliding_attention" ? MaskKind.Sliding : MaskKind.Full;
            return new DecoderLayer(
                new StandardAttention(c, new(bias, bias, QkNorm.None, true, kind, window), init, ctx => rope.CosSin(ctx.Positions, ctx.DType)),
                "mlp", new GptOssMlp(c, init),
                new RmsNorm(c.HiddenSize, c.RmsEps, init, scaleInFp32: true), new RmsNorm(c.HiddenSize, c.RmsEps, init, scaleInFp32: true));
        }, new RmsNorm(c.HiddenSize, c.RmsEps, init, scaleInFp32: true));
    }
}

internal sealed class GptOssMlp : HfModule, IBlock
{
    readonly RouterWeight _router;
    readonly GptOssExperts _experts;
    readonly int _topK;

    public GptOssMlp(ModelConfig c, Init init)
    {
        long e = c.Long("num_local_experts");
        _topK = (int)c.Long("num_experts_per_tok");
        _router = AddChild("router", new RouterWeight(e, c.HiddenSize, init, hasBias: true));
        _experts = AddChild("experts", new GptOssExperts(e, c.HiddenSize, c.Long("intermediate_size"), c.DoubleOr("swiglu_limit", 7.0), init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var shape = x.shape;
        var flat = x.reshape(-1, shape[^1]);
        var logits = _router.Logits(flat);
        ctx.RouterLogits.Add(logits);
        var (topV, topIdx) = logits.topk(_topK, -1);
        var topW = topV.softmax(1, topV.dtype);
        return _experts.Forward(flat, topIdx, topW).view(shape);
    }
}

internal sealed class GptOssExperts : ExpertsBase
{
    const double Alpha = 1.702;
    readonly double _limit;
    public override bool IsTransposed => true;

    public GptOssExperts(long experts, long hidden, long intermediate, double limit, Init init)
    {
        NumExperts = experts; _limit = limit;
        AddParameter("gate_up_proj", init.Normal(experts, hidden, 2 * intermediate));
        AddParameter("gate_up_proj_bias", init.Zeros(experts, 2 * intermediate));
        AddParameter("down_proj", init.Normal(experts, intermediate, hidden));
        AddParameter("down_proj_bias", init.Zeros(experts, hidden));
    }

    public Tensor Forward(Tensor x, Tensor topIdx, Tensor topW)
    {
        if (Dispatching == ExpertDispatch.Loop) return ForwardLoop(x, topIdx, topW);
        var g = Group(topIdx);
        var h = RunExperts(g, x.index_select(0, g.TokenOf), (ops, xe) =>
        {
            var gu = ops.Mm(xe, "gate_up_proj", transposeWeight: false) + ops.Bias("gate_up_proj_bias");
            var gate = gu.index(TensorIndex.Ellipsis, TensorIndex.Slice(0, null, 2)).clamp(max: _limit);
            var up = gu.index(TensorIndex.Ellipsis, TensorIndex.Slice(1, null, 2)).clamp(-_limit, _limit);
            var glu = gate * nn.functional.sigmoid(gate * Alpha);
            return ops.Mm((up + 1) * glu, "down_proj", transposeWeight: false) + ops.Bias("down_proj_bias");
        });
        var w = topW.flatten().index_select(0, g.Order).unsqueeze(-1);
        return zeros_like(x).index_add(0, g.TokenOf, (h * w).to(x.dtype), 1.0);
    }

    Tensor ForwardLoop(Tensor x, Tensor topIdx, Tensor topW)
    {
        var gateUp = Effective("gate_up_proj");
        var gateUpBias = Effective("gate_up_proj_bias");
        var down = Effective("down_proj");
        var downBias = Effective("down_proj_bias");
        var final = zeros_like(x);
        foreach (var (e, tok, slot) in Dispatch(topIdx, NumExperts))
        {
            var cur = x.index_select(0, tok);
            var gu = matmul(cur, gateUp[e]) + gateUpBias[e];
            var gate = gu.index(TensorIndex.Ellipsis, TensorIndex.Slice(0, null, 2)).clamp(max: _limit);
            var up = gu.index(TensorIndex.Ellipsis, TensorIndex.Slice(1, null, 2)).clamp(-_limit, _limit);
            var glu = gate * nn.functional.sigmoid(gate * Alpha);
            var h = matmul((up + 1) * glu, down[e]) + downBias[e];
            var w = topW.index(TensorIndex.Tensor(tok), TensorIndex.Tensor(slot)).unsqueeze(-1);
            final = final.index_add(0, tok, (h * w).to(final.dtype), 1.0);
        }
        return final;
    }
}
