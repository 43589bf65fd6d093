using MoeLora.Torch.Nn;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Lora;

/// <summary>A LoRA factor held as <c>lora_A.default</c> / <c>lora_B.default</c> (an nn.Linear without bias in PEFT).</summary>
public sealed class LoraFactor : HfModule
{
    public Parameter weight { get; }
    public LoraFactor(Tensor w) => weight = AddParameter("weight", w, requiresGrad: true);
}

/// <summary>Common PEFT wrapper structure: <c>base_layer</c>, <c>lora_dropout</c>, <c>lora_A</c>, <c>lora_B</c> dicts.</summary>
public abstract class LoraWrapper : HfModule
{
    public string AdapterName { get; }
    public LoraFactor A { get; }
    public LoraFactor B { get; }
    public double Scaling { get; }
    public int Rank { get; }

    /// <summary>lora_dropout's probability (0: none); the dropout acts in training only.</summary>
    public virtual double DropoutProbability => 0;

    /// <summary>False inside PEFT's <c>disable_adapter()</c>: the wrapper computes the base layer only.</summary>
    public bool Enabled { get; set; } = true;

    /// <summary>The base weight this adapter changes (what <c>merge_and_unload</c> writes W+ΔW into).</summary>
    public abstract Parameter Target { get; }

    /// <summary>The merged weight PEFT's <c>merge</c> computes for <see cref="Target"/> given its current value.</summary>
    public abstract Tensor Merge(Tensor weight);

    protected LoraWrapper(HfModule baseLayer, string adapter, Tensor a, Tensor b, double scaling, int rank)
    {
        AdapterName = adapter; Scaling = scaling; Rank = rank;
        AddChild("base_layer", baseLayer);
        AddChild("lora_dropout", new Container()).Add(adapter, new Container());
        A = AddChild("lora_A", new Container()).Add(adapter, new LoraFactor(a));
        B = AddChild("lora_B", new Container()).Add(adapter, new LoraFactor(b));
    }
}

/// <summary>PEFT <c>lora.Linear</c>: <c>y = base(x) + B(A(dropout(x))) * scaling</c>.</summary>
public sealed class LoraLinear : LoraWrapper, ILinearAdapter
{
    readonly double _dropout;

    readonly Linear _layer;

    /// <summary>
    /// True on this thread: PEFT's own path (an fp32 copy kept for backward), for tests that compare the two. Per thread,
    /// so a test that switches it cannot change a training run another test has going at the same time.
    /// </summary>
    [ThreadStatic] internal static bool KeepWideCopy;

    public LoraLinear(Linear baseLayer, string adapter, Tensor a, Tensor b, double scaling, int rank, double dropout)
        : base(baseLayer, adapter, a, b, scaling, rank)
    {
        _dropout = dropout; _layer = baseLayer;
        baseLayer.Adapters.Add(this);
    }

    public override Parameter Target => _layer.weight;

    public override double DropoutProbability => _dropout;

    /// <summary>W + s·B·A (PEFT's <c>get_delta_weight</c>).</summary>
    public override Tensor Merge(Tensor weight) => weight + (matmul(B.weight, A.weight) * Scaling).to(weight.dtype);

    public Tensor Apply(Tensor x, Tensor baseOutput, Linear layer)
    {
        if (!Enabled) return baseOutput;
        var dropout = _dropout > 0 && Training;
        Tensor down;
        if (!KeepWideCopy && !dropout && x.dtype != A.weight.dtype && is_grad_enabled() && A.weight.requires_grad)
        {
            // PEFT's x.to(fp32) @ Aᵀ, keeping the bf16 x rather than its fp32 copy for backward (same gradients).
            down = CastLinear.Apply(x, A.weight);
        }
        else
        {
            var h = x.to(A.weight.dtype);
            if (dropout) h = nn.functional.dropout(h, _dropout, training: true);
            down = nn.functional.linear(h, A.weight);
        }
        var delta = nn.functional.linear(down, B.weight) * Scaling;
        return PeftRounding.Sum(baseOutput, delta);
    }
}

/// <summary>How PEFT's <c>lora.Linear.forward</c> adds an adapter's output to the base layer's.</summary>
internal static class PeftRounding
{
    /// <summary>
    /// <c>(result + delta).to(result.dtype)</c>: PEFT adds the fp32 adapter output to the bf16/fp16 base output with
    /// torch's type promotion (the sum is fp32) and casts once at the end (<c>result.to(torch_result_dtype)</c>).
    /// Casting the delta first and adding in the narrow dtype rounds twice and differs by one unit in the last place on
    /// some elements. The fp32 sum is a transient: neither the add nor the cast keeps anything for backward.
    /// </summary>
    public static Tensor Sum(Tensor result, Tensor delta) =>
        delta.dtype == result.dtype ? result + delta : (result + delta).to(result.dtype);
}

/// <summary>
/// PEFT <c>ParamWrapper</c> on a 3-D expert parameter. A is (r·E, in) with expert-major rows, B is (out, r·E) with
/// rank-major columns; ΔW = einsum(B.reshape(out, r, E), A.reshape(E, r, in)) → (E, out, in) for transformers-v5
/// (E, out, in) parameters (in/out swapped by PEFT ≥ 0.19.1) or (E, in, out) for <c>is_transposed</c> owners.
/// </summary>
public sealed class ParamLora : LoraWrapper, ILowRankExpertDelta
{
    public string ParameterName { get; }
    public long NumExperts { get; }
    readonly bool _transposed;

    public ParamLora(HfModule baseLayer, ExpertsBase owner, string parameterName, string adapter, Tensor a, Tensor b, double scaling, int rank)
        : base(baseLayer, adapter, a, b, scaling, rank)
    {
        ParameterName = parameterName;
        // The parameter's own expert count: LongCat's gate_up_proj also has rows for its identity experts.
        NumExperts = owner.Param(parameterName).shape[0];
        _transposed = owner.IsTransposed;
        _target = owner.Param(parameterName);
        owner.AttachDelta(parameterName, this);
    }

    readonly Parameter _target;
    public override Parameter Target => _target;
    public override Tensor Merge(Tensor weight) => weight + Delta().to(weight.dtype);

    public Tensor Delta()
    {
        var a = A.weight.reshape(NumExperts, -1, A.weight.shape[^1]);      // (E, r, in)
        var b = B.weight.reshape(B.weight.shape[0], -1, NumExperts);        // (out, r, E)
        var d = einsum(_transposed ? "ore,eri->eio" : "ore,eri->eoi", b, a);
        return d * Scaling;
    }

    /// <summary>
    /// ΔW[e] = L[e]·R[e] without forming ΔW: for (E, out, in) parameters L = s·B_e (out, r), R = A_e (r, in);
    /// for <c>is_transposed</c> (E, in, out) ones L = s·A_eᵀ (in, r), R = B_eᵀ (r, out).
    /// </summary>
    public (Tensor L, Tensor R) Factors()
    {
        var a = A.weight.reshape(NumExperts, -1, A.weight.shape[^1]);      // (E, r, in)
        var b = B.weight.reshape(B.weight.shape[0], -1, NumExperts);        // (out, r, E)
        return _transposed
            ? (a.transpose(1, 2) * Scaling, b.permute(2, 1, 0))            // (E, in, r), (E, r, out)
            : (b.permute(2, 0, 1) * Scaling, a);                            // (E, out, r), (E, r, in)
    }

    /// <summary>(in, out) features as PEFT computes them for a 3-D parameter of this owner.</summary>
    public static (long In, long Out) Features(Tensor param, bool isTransposed) =>
        isTransposed ? (param.shape[1], param.shape[2]) : (param.shape[2], param.shape[1]);
}
