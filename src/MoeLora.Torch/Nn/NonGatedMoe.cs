using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>A non-gated MLP <c>down_proj(act(up_proj(x)))</c> (<see cref="NonGatedMlpSettings"/>; NemotronHMLP).</summary>
public sealed class NonGatedMlp : HfModule, IBlock
{
    public Linear up_proj { get; }
    public Linear down_proj { get; }
    readonly Activation _act;

    public NonGatedMlp(long hidden, NonGatedMlpSettings s, Init init)
    {
        up_proj = AddChild("up_proj", new Linear(hidden, s.Intermediate, s.Bias, init));
        down_proj = AddChild("down_proj", new Linear(s.Intermediate, hidden, s.Bias, init));
        _act = AddChild("act_fn", new Activation(s.Act));
    }

    public Tensor Forward(Tensor x) => down_proj.Forward(_act.Forward(up_proj.Forward(x)));

    public Tensor Forward(Tensor x, ForwardContext ctx) => Forward(x);
}

/// <summary>
/// Non-gated fused experts (NemotronHExperts): <c>up_proj [E, I, W]</c>, <c>down_proj [E, W, I]</c>, (out, in) per
/// expert, <c>down(act(up(x))) · w</c> summed in the routing weights' dtype, then cast back.
/// </summary>
public sealed class UpDownExperts : ExpertsBase
{
    readonly Activation _act;
    public override bool IsTransposed => false;

    public UpDownExperts(long experts, long width, long intermediate, string act, Init init)
    {
        NumExperts = experts;
        AddParameter("up_proj", init.Normal(experts, intermediate, width));
        AddParameter("down_proj", init.Normal(experts, width, intermediate));
        _act = AddChild("act_fn", new Activation(act));
    }

    /// <param name="x">[T, W]</param><param name="topIdx">[T, k] int64</param><param name="topW">[T, k]</param>
    public Tensor Forward(Tensor x, Tensor topIdx, Tensor topW)
    {
        if (Dispatching == ExpertDispatch.Loop)
        {
            var sum = zeros([x.shape[0], x.shape[1]], topW.dtype, x.device);
            var up = Effective("up_proj");
            var down = Effective("down_proj");
            foreach (var (e, tok, slot) in Dispatch(topIdx, NumExperts))
            {
                var h = nn.functional.linear(_act.Forward(nn.functional.linear(x.index_select(0, tok), up[e])), down[e]);
                var w = topW.index(TensorIndex.Tensor(tok), TensorIndex.Tensor(slot)).unsqueeze(-1);
                sum = sum.index_add(0, tok, (h * w).to(sum.dtype), 1.0);
            }
            return sum.to(x.dtype);
        }
        return Recomputed(x, topIdx, topW, ForwardGrouped);
    }

    Tensor ForwardGrouped(Tensor x, Grouping g, Tensor topW)
    {
        var y = RunExperts(g, x.index_select(0, g.TokenOf), (ops, xe) =>
            ops.Mm(_act.Forward(ops.Mm(xe, "up_proj", transposeWeight: true)), "down_proj", transposeWeight: true));
        var wt = topW.flatten().index_select(0, g.Order).unsqueeze(-1);
        var sum = zeros([x.shape[0], x.shape[1]], topW.dtype, x.device);
        return sum.index_add(0, g.TokenOf, (y * wt).to(sum.dtype), 1.0).to(x.dtype);
    }
}

/// <summary>
/// Nemotron-H's MoE block (<see cref="NonGatedMoeSettings"/>): the DeepSeek-V3 router on fp32 logits (sigmoid,
/// group-limited top-k on scores + e_score_correction_bias, weights from the uncorrected scores, renormalised with
/// +1e-20, times routed_scaling_factor), the non-gated experts on the latent projection of the input, projected back,
/// plus the shared MLP on the block input.
/// </summary>
public sealed class NonGatedMoe : HfModule, IBlock
{
    readonly UpDownExperts _experts;
    readonly GroupLimitedRouter _gate;
    readonly NonGatedMlp _shared;
    readonly Linear? _fc1, _fc2;
    readonly SigmoidGroupLimitedRouterSettings _r;

    public NonGatedMoe(long hidden, NonGatedMoeSettings s, Init init)
    {
        _r = s.Router;
        var width = s.LatentSize ?? hidden;
        _experts = AddChild("experts", new UpDownExperts(_r.NumExperts, width, s.Intermediate, s.Act, init));
        _gate = AddChild(_r.Name, new GroupLimitedRouter(_r.NumExperts, hidden, init));
        _shared = AddChild("shared_experts", new NonGatedMlp(hidden, s.Shared, init));
        if (s.LatentSize is { } latent)
        {
            _fc1 = AddChild("fc1_latent_proj", new Linear(hidden, latent, s.LatentBias, init));
            _fc2 = AddChild("fc2_latent_proj", new Linear(latent, hidden, s.LatentBias, init));
        }
        else
        {
            // nn.Identity in transformers: present in named_modules, no parameters.
            AddChild("fc1_latent_proj", new Container());
            AddChild("fc2_latent_proj", new Container());
        }
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var shape = x.shape;
        var flat = x.reshape(-1, shape[^1]);
        var logits = nn.functional.linear(flat.to(ScalarType.Float32), _gate.EffectiveWeight().to(ScalarType.Float32));
        ctx.RouterLogits.Add(logits);
        var (topIdx, topW) = SigmoidGroupLimitedMoe.Route(logits, _gate.e_score_correction_bias, _r);
        var h = _fc1 is null ? flat : _fc1.Forward(flat);
        h = _experts.Forward(h, topIdx, topW);
        if (_fc2 is not null) h = _fc2.Forward(h);
        return h.view(shape) + _shared.Forward(x);
    }
}
