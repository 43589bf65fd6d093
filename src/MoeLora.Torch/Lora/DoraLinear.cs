using MoeLora.Torch.Nn;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Lora;

/// <summary>
/// PEFT's DoRA on a Linear (<c>lora.Linear</c> with <c>use_dora=True</c>): a trainable magnitude vector
/// <c>m = ‖W + s·BA‖</c> (row norms, one per output feature, fp32) registered as
/// <c>lora_magnitude_vector.{adapter}.weight</c>. Forward adds
/// <c>(m/‖W + s·BA‖ − 1)·(x Wᵀ) + (m/‖W + s·BA‖)·s·B(A(x))</c> to the base output, with the norm detached
/// (DoRA paper §4.3, as PEFT). With dropout active in training the base product is recomputed on the dropped input.
/// </summary>
public sealed class DoraLinear : LoraWrapper, ILinearAdapter
{
    readonly double _dropout;
    public LoraFactor Magnitude { get; }
    public override double DropoutProbability => _dropout;

    public DoraLinear(Linear baseLayer, string adapter, Tensor a, Tensor b, double scaling, int rank, double dropout)
        : base(baseLayer, adapter, a, b, scaling, rank)
    {
        _dropout = dropout;
        Tensor norm;
        using (no_grad())
        {
            var w = baseLayer.weight.to(ScalarType.Float32) + scaling * matmul(B.weight.to(ScalarType.Float32), A.weight.to(ScalarType.Float32)); // a, b now belong to the factors
            norm = linalg.norm(w, dims: [1]).to(ScalarType.Float32).detach();
        }
        Magnitude = AddChild("lora_magnitude_vector", new Container()).Add(adapter, new LoraFactor(norm));
        _layer = baseLayer;
        baseLayer.Adapters.Add(this);
    }

    readonly Linear _layer;
    public override Parameter Target => _layer.weight;

    /// <summary>PEFT's DoRA merge: <c>(m / ‖W + s·BA‖) · (W + s·BA)</c>, row norms.</summary>
    public override Tensor Merge(Tensor weight)
    {
        var w = weight.to(ScalarType.Float32) + Scaling * matmul(B.weight, A.weight).to(ScalarType.Float32);
        var norm = linalg.norm(w, dims: [1]);
        return ((Magnitude.weight / norm).view(-1, 1) * w).to(weight.dtype);
    }

    public Tensor Apply(Tensor x, Tensor baseOutput, Linear layer)
    {
        if (!Enabled) return baseOutput;
        var h = x.to(A.weight.dtype);
        bool dropped = _dropout > 0 && Training;
        if (dropped) h = nn.functional.dropout(h, _dropout, training: true);
        var loraResult = nn.functional.linear(nn.functional.linear(h, A.weight), B.weight);
        var weight = layer.weight.to(h.dtype);
        var loraWeight = matmul(B.weight, A.weight).detach();
        var weightNorm = linalg.norm(weight + Scaling * loraWeight, dims: [1]).detach();
        var scale = (Magnitude.weight / weightNorm).view(1, -1);
        Tensor basePart = dropped
            ? nn.functional.linear(h, weight)
            : (layer.bias is null ? baseOutput : baseOutput - layer.bias).to(h.dtype);
        var dora = (scale - 1) * basePart + scale * loraResult * Scaling;
        return PeftRounding.Sum(baseOutput, dora);
    }
}

/// <summary>
/// PEFT <c>ParamWrapper</c> on a 2-D parameter (e.g. a router's <c>gate.weight</c> via target_parameters):
/// A is (r, in), B is (out, r), and the parameter is used as <c>W + s·BA</c> while the owner runs.
/// On an nn.Linear owner too (see <see cref="Linear.WeightDeltas"/>): PEFT casts ΔW to the weight's dtype and adds
/// it to W, so a bf16 layer rounds as PEFT's, which an extra <c>x·ΔWᵀ</c> term would not.
/// </summary>
public sealed class ParamLora2D : LoraWrapper, ILowRankDelta
{
    public string ParameterName { get; }

    public ParamLora2D(HfModule baseLayer, HfModule owner, string parameterName, string adapter, Tensor a, Tensor b, double scaling, int rank)
        : base(baseLayer, adapter, a, b, scaling, rank)
    {
        ParameterName = parameterName;
        _target = owner.DirectParameters.FirstOrDefault(kv => kv.Key == parameterName).Value
            ?? throw new NotSupportedException($"{owner.GetType().Name} has no parameter '{parameterName}'.");
        if (owner is IParamDeltaOwner any)
        {
            any.AttachDelta(parameterName, this);
            return;
        }
        if (parameterName != "weight")
            throw new NotSupportedException($"target_parameters on '{parameterName}' of {owner.GetType().Name} is not supported (2-D 'weight' only).");
        switch (owner)
        {
            case RouterWeight r: r.AttachDelta(this); break;
            case GroupLimitedRouter d: d.AttachDelta(this); break;
            case ScoredRouter s: s.AttachDelta(this); break;
            case Linear l: l.WeightDeltas.Add(this); break;
            default: throw new NotSupportedException($"target_parameters on {owner.GetType().Name}.{parameterName} is not supported by MoeLora.Torch.");
        }
    }

    readonly Parameter _target;
    public override Parameter Target => _target;
    public override Tensor Merge(Tensor weight) => weight + Delta().to(weight.dtype);

    public Tensor Delta() => matmul(B.weight, A.weight) * Scaling;

    /// <summary>ΔW = (s·B) · A: B (out, r), A (r, in).</summary>
    public (Tensor L, Tensor R) Factors() => (B.weight * Scaling, A.weight);

}
