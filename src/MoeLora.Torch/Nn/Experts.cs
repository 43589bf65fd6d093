using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>A weight delta added to a 3-D expert parameter while it is used (PEFT's ParamWrapper parametrization).</summary>
public interface IParamDelta
{
    Tensor Delta();

    /// <summary>False while adapters are disabled (the parameter is used unchanged).</summary>
    bool Enabled { get; }
}

/// <summary>
/// Base of the fused-expert modules: holds 3-D expert parameters and applies attached LoRA deltas,
/// so <c>W_eff = W + ΔW</c> exactly as PEFT's parametrization does during the forward.
/// </summary>
public abstract class ExpertsBase : HfModule
{
    readonly Dictionary<string, List<IParamDelta>> _deltas = [];

    /// <summary>
    /// The owner's <c>is_transposed</c> flag as PEFT sees it: true means (E, in, out) and no in/out swap (gpt-oss);
    /// false means PEFT treats the parameter as (E, out, in) (transformers-v5 experts, and Llama4, see there).
    /// </summary>
    public abstract bool IsTransposed { get; }
    public long NumExperts { get; protected init; }

    public Parameter Param(string name) =>
        DirectParameters.FirstOrDefault(kv => kv.Key == name).Value ?? throw new KeyNotFoundException($"experts has no parameter '{name}'.");

    internal void AttachDelta(string name, IParamDelta d)
    {
        if (!_deltas.TryGetValue(name, out var l)) _deltas[name] = l = [];
        l.Add(d);
    }

    protected Tensor Effective(string name)
    {
        Tensor w = Param(name);
        if (!_deltas.TryGetValue(name, out var l)) return w;
        foreach (var d in l) if (d.Enabled) w = w + d.Delta().to(w.dtype);
        return w;
    }

    /// <summary>
    /// How many (token, slot) pairs the router sent to each expert in the last forward: the experts actually
    /// dispatched (after any bias/group selection), for gradient-flow checks.
    /// </summary>
    public long[]? LastSelectedCounts { get; private set; }

    /// <summary>(expert, tokens, top-k slot) for each expert hit, like transformers' <c>torch.where(expert_mask[e])</c>.</summary>
    protected IEnumerable<(long Expert, Tensor Tokens, Tensor Slots)> Dispatch(Tensor topIdx, long numExperts)
    {
        Tensor hits;
        using (no_grad()) hits = topIdx.flatten().bincount(null, numExperts);
        var counts = hits.data<long>().ToArray();
        LastSelectedCounts = counts;
        for (long e = 0; e < numExperts; e++)
        {
            if (counts[e] == 0) continue;
            var where = topIdx.eq(e).nonzero();            // [n, 2] rows (token, slot), token-major
            yield return (e, where[.., 0], where[.., 1]);
        }
    }
}

/// <summary>
/// transformers-v5 fused experts (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3): <c>gate_up_proj [E, 2I, H]</c>
/// (rows [0,I) gate, [I,2I) up) and <c>down_proj [E, H, I]</c>, per expert <c>down(act(gate) * up) * w</c>,
/// accumulated with index_add in expert order.
/// </summary>
public sealed class FusedExperts : ExpertsBase
{
    readonly Activation _act;
    public override bool IsTransposed => false;

    public FusedExperts(long experts, long hidden, long intermediate, string act, Init init)
    {
        NumExperts = experts;
        AddParameter("gate_up_proj", init.Normal(experts, 2 * intermediate, hidden));
        AddParameter("down_proj", init.Normal(experts, hidden, intermediate));
        _act = AddChild("act_fn", new Activation(act));
    }

    /// <param name="x">[T, H]</param><param name="topIdx">[T, k] int64</param><param name="topW">[T, k]</param>
    public Tensor Forward(Tensor x, Tensor topIdx, Tensor topW)
    {
        var gateUp = Effective("gate_up_proj");
        var down = Effective("down_proj");
        var final = zeros_like(x);
        foreach (var (e, tok, slot) in Dispatch(topIdx, NumExperts))
        {
            var cur = x.index_select(0, tok);
            var gu = nn.functional.linear(cur, gateUp[e]).chunk(2, -1);
            var h = nn.functional.linear(_act.Forward(gu[0]) * gu[1], down[e]);
            var w = topW.index(TensorIndex.Tensor(tok), TensorIndex.Tensor(slot)).unsqueeze(-1);
            final = final.index_add(0, tok, (h * w).to(final.dtype), 1.0);
        }
        return final;
    }
}

/// <summary>Router holding one <c>weight [E, H]</c> (transformers-v5 <c>XTopKRouter</c>): returns raw logits.</summary>
public sealed class RouterWeight : HfModule
{
    public Parameter weight { get; }
    public Parameter? bias { get; }
    readonly List<IParamDelta> _deltas = [];
    public RouterWeight(long experts, long hidden, Init init, bool hasBias = false)
    {
        weight = AddParameter("weight", init.Normal(experts, hidden));
        if (hasBias) bias = AddParameter("bias", init.Normal(experts));
    }
    /// <summary>Attaches a 2-D ParamWrapper delta to <c>weight</c> (target_parameters on the router).</summary>
    internal void AttachDelta(IParamDelta d) => _deltas.Add(d);
    public Tensor EffectiveWeight() => ParamDeltas.Apply(weight, _deltas);
    public Tensor Logits(Tensor x) => nn.functional.linear(x, EffectiveWeight(), bias);
}
