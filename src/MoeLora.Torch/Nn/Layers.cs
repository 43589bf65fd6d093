using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>Attached LoRA computation on a module (naming lives in the PEFT wrapper nodes, see Lora/).</summary>
public interface ILinearAdapter
{
    /// <summary>Returns the adapted output given the input and the base output (y = base(x)).</summary>
    Tensor Apply(Tensor x, Tensor baseOutput, Linear layer);
}

/// <summary><c>nn.Linear</c>: weight [out, in], optional bias [out].</summary>
public sealed class Linear : HfModule
{
    public Parameter weight { get; private set; }
    public Parameter? bias { get; }
    public long InFeatures { get; }
    public long OutFeatures { get; }
    internal List<ILinearAdapter> Adapters { get; } = [];

    /// <summary>
    /// ParamWrapper deltas on <c>weight</c> (target_parameters naming a Linear's weight, e.g. Llama 4's router): used as
    /// PEFT's parametrization uses them, <c>linear(x, W + ΔW.to(W.dtype))</c>, before any <see cref="Adapters"/>.
    /// </summary>
    internal List<IParamDelta> WeightDeltas { get; } = [];

    public Linear(long inFeatures, long outFeatures, bool hasBias, Init init)
    {
        InFeatures = inFeatures; OutFeatures = outFeatures;
        weight = AddParameter("weight", init.Normal(outFeatures, inFeatures));
        if (hasBias) bias = AddParameter("bias", init.Zeros(outFeatures));
    }


    /// <summary>tie_word_embeddings: the LM head's weight *is* the embedding's Parameter (as transformers ties them).</summary>
    internal void TieTo(Parameter shared)
    {
        if (!shared.shape.SequenceEqual(weight.shape))
            throw new InvalidDataException($"cannot tie a [{string.Join(",", weight.shape)}] weight to a [{string.Join(",", shared.shape)}] one");
        weight.Dispose();
        weight = shared;
        ShareParameter("weight", shared);
    }

    public Tensor Forward(Tensor x)
    {
        var w = WeightDeltas.Count == 0 ? weight : ParamDeltas.Apply(weight, WeightDeltas);
        var y = nn.functional.linear(x, w, bias);
        foreach (var a in Adapters) y = a.Apply(x, y, this);
        return y;
    }
}

/// <summary>RMSNorm as transformers computes it: statistics in fp32, cast back, then scale.</summary>
public sealed class RmsNorm : HfModule, INorm
{
    public Parameter weight { get; }
    readonly double _eps;
    readonly bool _scaleInFp32;

    /// <param name="scaleInFp32">gpt-oss multiplies by the weight before casting back; the others cast first.</param>
    public RmsNorm(long size, double eps, Init init, bool scaleInFp32 = false)
    {
        _eps = eps; _scaleInFp32 = scaleInFp32;
        weight = AddParameter("weight", init.Ones(size));
    }

    public RmsNorm(long size, Core.Architectures.Runtime.NormSettings norm, Init init)
        : this(size, norm.Eps, init, norm.Kind == Core.Architectures.Runtime.NormKind.RmsWeightInFp32)
    {
        // (1 + weight) norms (MiniMax-M3) start from a zero weight and scale in fp32.
        if (norm.Kind == Core.Architectures.Runtime.NormKind.RmsOnePlusWeight) { _onePlus = true; using (no_grad()) weight.zero_(); }
    }

    readonly bool _onePlus;


    public Tensor Forward(Tensor x)
    {
        var dt = x.dtype;
        var h = x.to(ScalarType.Float32);
        var v = h.pow(2).mean([-1], keepdim: true);
        h = h * rsqrt(v + _eps);
        if (_onePlus) return (h * (weight.to(ScalarType.Float32) + 1.0)).to(dt);
        return _scaleInFp32 ? (weight * h).to(dt) : weight * h.to(dt);
    }

    /// <summary>Parameter-free RMS normalisation (Llama4's L2Norm on q/k).</summary>
    public static Tensor Normalize(Tensor x, double eps)
    {
        var h = x.to(ScalarType.Float32);
        return (h * rsqrt(h.pow(2).mean([-1], keepdim: true) + eps)).to(x.dtype);
    }
}

public sealed class Embedding : HfModule
{
    public Parameter weight { get; }
    public Embedding(long vocab, long dim, Init init) => weight = AddParameter("weight", init.Normal(vocab, dim));
    public Tensor Forward(Tensor ids) => weight.index_select(0, ids.flatten()).view([.. ids.shape, weight.shape[1]]);
}

/// <summary>The activation module every HF MLP registers (parameter-free; present in named_modules).</summary>
public sealed class Activation(string name) : HfModule
{
    public string Name { get; } = name;

    public Tensor Forward(Tensor x) => Name switch
    {
        "silu" or "swish" => nn.functional.silu(x),
        "gelu" => nn.functional.gelu(x),
        "relu" => nn.functional.relu(x),
        "relu2" => nn.functional.relu(x).square(), // transformers' ReLUSquaredActivation

        _ => throw new NotSupportedException($"hidden_act '{Name}' is not supported."),
    };
}

/// <summary>
/// Gated MLP <c>down(act(gate(x)) * up(x))</c> with HF child names gate_proj, up_proj, down_proj (or the family's
/// names, e.g. LFM2's w1, w3, w2), then the activation module unless the family calls it functionally.
/// </summary>
public sealed class GatedMlp : HfModule, IBlock
{
    public Linear gate_proj { get; }
    public Linear up_proj { get; }
    public Linear down_proj { get; }
    readonly Activation _act;
    readonly Parameter? _globalScale;

    public GatedMlp(long hidden, Core.Architectures.Runtime.GatedMlpSettings s, Init init)
        : this(hidden, s.Intermediate, s.Act, init, s.Bias, s.ActName, s.Names, s.ClampLimit, s.ClampAfterActivation)
    {
        // A direct Parameter: named_parameters lists it before the projections whatever the registration order.
        if (s.GlobalScale is { } name) _globalScale = AddParameter(name, init.Ones(1));
    }

    /// <param name="clampLimit">DeepSeek-V4's shared expert: gate clamped to at most L, up to ±L, before the activation.</param>
    /// <param name="clampAfterActivation">Step-3.7's MLPs: act(gate) clamped to at most L instead of gate.</param>
    public GatedMlp(long hidden, long intermediate, string act, Init init, bool bias = false, string? actName = "act_fn",
        Core.Architectures.Runtime.GatedMlpNames? names = null, double? clampLimit = null, bool clampAfterActivation = false)
    {
        _clamp = clampLimit;
        _clampAfterActivation = clampAfterActivation;
        gate_proj = AddChild(names?.Gate ?? "gate_proj", new Linear(hidden, intermediate, bias, init));
        up_proj = AddChild(names?.Up ?? "up_proj", new Linear(hidden, intermediate, bias, init));
        down_proj = AddChild(names?.Down ?? "down_proj", new Linear(intermediate, hidden, bias, init));
        _act = actName is null ? new Activation(act) : AddChild(actName, new Activation(act));
    }

    readonly double? _clamp;
    readonly bool _clampAfterActivation;

    public Tensor Forward(Tensor x)
    {
        var gate = gate_proj.Forward(x);
        var up = up_proj.Forward(x);
        var hidden = _clamp is { } limit ? ClampedSwiglu.Apply(gate, up, limit, _act.Forward, afterActivation: _clampAfterActivation)
            : _act.Forward(gate) * up;
        var y = down_proj.Forward(hidden);
        return _globalScale is null ? y : y * _globalScale;
    }

    public Tensor Forward(Tensor x, ForwardContext ctx) => Forward(x);
}
