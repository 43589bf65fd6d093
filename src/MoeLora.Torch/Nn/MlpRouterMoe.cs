using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// ZAYA's MoE block (<c>ZayaSparseMoeBlock</c>): the MLP router <c>gate</c> (<see cref="MlpRouterSettings"/>), then the
/// fused experts. The router reads the previous layer's router state from, and leaves its own in,
/// <see cref="ForwardContext.RouterState"/>; a token whose pick is the skip expert gets expert 0 with weight 0.
/// </summary>
public sealed class MlpRouterMoe : HfModule, IBlock
{
    readonly MlpRouter _gate;
    readonly FusedExperts _experts;
    readonly MlpRouterSettings _r;

    public MlpRouterMoe(long hidden, MoeSettings s, Init init)
    {
        _r = (MlpRouterSettings)s.Router;
        _gate = AddChild(_r.Name, new MlpRouter(hidden, _r, init));
        _experts = AddChild("experts", new FusedExperts(s.Experts.NumExperts, hidden, s.Experts.Intermediate, s.Experts.Act, init));
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var shape = x.shape;
        var (logits, state) = _gate.Forward(x, ctx.RouterState);
        ctx.RouterState = state;
        // ZayaRouter.forward: softmax; selection on the detached fp32 softmax + balancing_biases; the skip expert (index E)
        // keeps no weight and is sent to expert 0.
        var probs = logits.softmax(-1);
        Tensor idx;
        using (no_grad()) idx = (probs.detach().to(ScalarType.Float32) + _gate.BalancingBiases).topk((int)_r.TopK, -1).indexes;
        var w = probs.gather(-1, idx);
        var skip = idx.eq(_r.NumExperts);
        w = w.masked_fill(skip, 0);
        idx = idx.masked_fill(skip, 0);
        ctx.RouterLogits.Add(logits.reshape(-1, _r.NumExperts + 1));
        var flat = x.reshape(-1, shape[^1]);
        return _experts.Forward(flat, idx.reshape(-1, _r.TopK), w.reshape(-1, _r.TopK)).view(shape);
    }
}

/// <summary>
/// <c>ZayaRouter</c>: router_states_scale (from the second layer on), down_proj, router_mlp (norm, fc1, fc2, out_proj,
/// GELU), and the persistent buffer balancing_biases [E + 1] (zeros, −1 for the skip expert).
/// </summary>
public sealed class MlpRouter : HfModule
{
    readonly Parameter? _stateScale;
    readonly Linear _down, _fc1, _fc2, _out;
    readonly RmsNorm _norm;
    readonly Activation _act;

    public Tensor BalancingBiases { get; }

    public MlpRouter(long hidden, MlpRouterSettings r, Init init)
    {
        long width = r.RouterHidden;
        if (r.UsesPreviousState) _stateScale = AddParameter("router_states_scale", init.Ones(width));
        _down = AddChild("down_proj", new Linear(hidden, width, true, init));
        var mlp = AddChild("router_mlp", new Container());
        _norm = mlp.Add("norm", new RmsNorm(width, r.NormEps, init));
        _fc1 = mlp.Add("fc1", new Linear(width, width, true, init));
        _fc2 = mlp.Add("fc2", new Linear(width, width, true, init));
        _out = mlp.Add("out_proj", new Linear(width, r.NumExperts + 1, false, init));
        _act = mlp.Add("act_fn", new Activation("gelu"));
        var biases = zeros(r.NumExperts + 1, ScalarType.Float32, init.Device);
        biases[r.NumExperts] = tensor(-1.0f);
        BalancingBiases = AddBuffer("balancing_biases", biases);
    }

    /// <summary>x [B, S, H] → the logits [B, S, E + 1] and this layer's router state [B, S, R].</summary>
    public (Tensor Logits, Tensor State) Forward(Tensor x, Tensor? previous)
    {
        var h = _down.Forward(x);
        if (_stateScale is not null && previous is not null) h = h + previous * _stateScale;
        var logits = _out.Forward(_act.Forward(_fc2.Forward(_act.Forward(_fc1.Forward(_norm.Forward(h))))));
        return (logits, h);
    }
}
