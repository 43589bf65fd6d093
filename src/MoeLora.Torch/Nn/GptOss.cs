using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// gpt-oss' MoE block (<see cref="TopKSoftmaxRouterSettings"/>): router with bias, softmax over the top-k logits, and
/// <see cref="GptOssExperts"/>.
/// </summary>
public sealed class GptOssMlp : HfModule, IBlock
{
    readonly RouterWeight _router;
    readonly GptOssExperts _experts;
    readonly int _topK;

    public GptOssMlp(long hidden, MoeSettings s, Init init)
    {
        var r = (TopKSoftmaxRouterSettings)s.Router;
        if (s.Shared is not null) throw new NotSupportedException("a shared expert beside gpt-oss experts has no runtime block yet.");
        _topK = (int)r.TopK;
        var router = new RouterWeight(r.NumExperts, hidden, init, hasBias: r.Bias);
        var experts = new GptOssExperts(s.Experts.NumExperts, hidden, s.Experts.Intermediate, s.Experts.SwigluLimit, init);
        if (s.Order == MoeOrder.ExpertsFirst) { _experts = AddChild("experts", experts); _router = AddChild(r.Name, router); }
        else { _router = AddChild(r.Name, router); _experts = AddChild("experts", experts); }
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

/// <summary>
/// gpt-oss' biased (E, in, out) experts with interleaved gate/up columns and the clamped SwiGLU
/// <c>(clamp(up,±L)+1) * g*sigmoid(1.702 g)</c>, g = clamp(gate, max=L).
/// </summary>
public sealed class GptOssExperts : ExpertsBase
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
        return Dispatching == ExpertDispatch.Loop ? ForwardLoop(x, topIdx, topW) : Recomputed(x, topIdx, topW, ForwardGrouped);
    }

    Tensor ForwardGrouped(Tensor x, Grouping g, Tensor topW)
    {
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
