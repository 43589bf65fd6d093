using TorchSharp;
using static TorchSharp.torch;
using static TorchSharp.torch.nn;

namespace MoeLora.Torch.Nn;

/// <summary>
/// A small module tree whose names and enumeration order mirror PyTorch's <c>named_modules()</c> /
/// <c>named_parameters()</c>: direct parameters first (registration order), then children in assignment order.
/// We do not use TorchSharp's reflection-based <c>nn.Module</c> registration because names must equal
/// transformers' runtime names exactly (including PEFT's <c>base_layer</c> wrappers) and field order is not a
/// reliable source of registration order.
/// </summary>
public abstract class HfModule
{
    readonly List<KeyValuePair<string, Parameter>> _params = [];
    readonly List<KeyValuePair<string, Tensor>> _buffers = [];
    readonly List<KeyValuePair<string, HfModule?>> _children = [];

    /// <summary>Train mode enables dropout (as PyTorch's <c>module.train()</c>); base weights stay frozen regardless.</summary>
    public bool Training { get; private set; }

    protected Parameter AddParameter(string name, Tensor value, bool requiresGrad = false)
    {
        var p = new Parameter(value, requiresGrad);
        p.DetachFromDisposeScope();
        _params.Add(new(name, p));
        return p;
    }

    /// <summary>Makes a registered parameter name refer to another module's Parameter (tied weights).</summary>
    protected void ShareParameter(string name, Parameter shared)
    {
        int i = _params.FindIndex(kv => kv.Key == name);
        if (i < 0) throw new KeyNotFoundException($"{GetType().Name} has no parameter '{name}'.");
        _params[i] = new(name, shared);
    }

    /// <summary>A persistent buffer (in the state dict, not a parameter), e.g. DeepSeek's e_score_correction_bias.</summary>
    /// <param name="derived">The module computes the value itself from the config (MiniMax's decay tables): a checkpoint
    /// that lacks it still loads, as transformers' <c>_init_weights</c> recomputes such buffers.</param>
    protected Tensor AddBuffer(string name, Tensor value, bool derived = false)
    {
        value.DetachFromDisposeScope();
        _buffers.Add(new(name, value));
        if (derived) _derived.Add(name);
        return value;
    }

    readonly HashSet<string> _derived = new(StringComparer.Ordinal);

    /// <summary>State-dict names of the derived buffers (see <see cref="AddBuffer"/>).</summary>
    public IEnumerable<string> DerivedBuffers(string prefix = "") =>
        NamedModules(prefix).SelectMany(m => m.Module._derived.Select(b => m.Name.Length == 0 ? b : $"{m.Name}.{b}"));

    protected T AddChild<T>(string name, T module) where T : HfModule
    {
        _children.Add(new(name, module));
        return module;
    }

    /// <summary>Swaps the child seen under <paramref name="name"/> (naming only: compute keeps its own references).</summary>
    internal void ReplaceChild(string name, HfModule module)
    {
        int i = _children.FindIndex(kv => kv.Key == name);
        if (i < 0) throw new KeyNotFoundException($"{GetType().Name} has no child '{name}'.");
        _children[i] = new(name, module);
    }

    internal IEnumerable<(string Name, HfModule Module)> Children =>
        _children.Where(kv => kv.Value is not null).Select(kv => (kv.Key, kv.Value!));

    internal IReadOnlyList<KeyValuePair<string, Parameter>> DirectParameters => _params;

    public IEnumerable<(string Name, HfModule Module)> NamedModules(string prefix = "")
    {
        var seen = new HashSet<HfModule>(ReferenceEqualityComparer.Instance);
        return Walk(this, prefix, seen);

        static IEnumerable<(string, HfModule)> Walk(HfModule m, string p, HashSet<HfModule> seen)
        {
            if (!seen.Add(m)) yield break; // PyTorch's remove_duplicate=True
            yield return (p, m);
            foreach (var (n, c) in m._children)
                if (c is not null)
                    foreach (var x in Walk(c, p.Length == 0 ? n : $"{p}.{n}", seen)) yield return x;
        }
    }

    /// <summary>Parameters deduplicated by object identity, first path wins (as PyTorch).</summary>
    public IEnumerable<(string Name, Parameter Param)> NamedParameters(string prefix = "")
    {
        var seen = new HashSet<Parameter>(ReferenceEqualityComparer.Instance);
        foreach (var (mn, m) in NamedModules(prefix))
            foreach (var (pn, p) in m._params)
                if (seen.Add(p)) yield return (mn.Length == 0 ? pn : $"{mn}.{pn}", p);
    }

    /// <summary>State dict: parameters then persistent buffers per module, children after.</summary>
    public IEnumerable<(string Name, Tensor Value)> StateDict(string prefix = "")
    {
        foreach (var (mn, m) in NamedModules(prefix))
        {
            foreach (var (pn, p) in m._params) yield return (mn.Length == 0 ? pn : $"{mn}.{pn}", p);
            foreach (var (bn, b) in m._buffers) yield return (mn.Length == 0 ? bn : $"{mn}.{bn}", b);
        }
    }

    public void Train(bool on = true)
    {
        foreach (var (_, m) in NamedModules()) m.Training = on;
    }

    public void Eval() => Train(false);
}

/// <summary>
/// A container node (<c>nn.ModuleList</c>, <c>nn.ModuleDict</c>, activation modules): no parameters of its own, except a
/// multimodal model's bare tower parameters, which the text-only forward never reads (DeepSeek-OCR-2's
/// <c>model.view_separator</c>, see <see cref="MoeLora.Core.Architectures.Runtime.InertTowers"/>).
/// </summary>
public sealed class Container : HfModule
{
    public T Add<T>(string name, T m) where T : HfModule => AddChild(name, m);

    /// <summary>A frozen parameter nothing runs (a bare tower parameter), filled by name from checkpoints.</summary>
    internal Parameter AddInertParameter(string name, Tensor value) => AddParameter(name, value);
}

/// <summary>Shared helpers for creating weights with a seeded generator or empty for loading.</summary>
public sealed record Init(ScalarType DType, Device Device, double Std, Generator? Generator)
{
    /// <summary>
    /// normal(0, std) like transformers' <c>_init_weights</c> for Linear, Embedding and expert tensors. With
    /// <see cref="DrawOnDevice"/> the target device's generator draws in place, in the target
    /// dtype (no host copy: real-size models on a GPU); otherwise fp32 is drawn on the CPU and cast, so the values are the
    /// same on every device (temporaries freed at once).
    /// </summary>
    public Tensor Normal(params long[] shape)
    {
        if (Generator is null) return empty(shape, DType, Device);
        if (DrawOnDevice)
            return Device.type == DeviceType.CPU ? empty(shape, DType, Device).normal_(0, Std, Generator)
                : empty(shape, DType, Device).normal_(0, Std); // the device's default generator, seeded by the factory
        using var drawn = normal(0, Std, shape, generator: Generator);
        if (drawn.dtype == DType && Device.type == DeviceType.CPU) return drawn.alias();
        using var cast = drawn.to(DType);
        return cast.to(Device);
    }

    /// <summary>Draw random weights in place on <see cref="Device"/> with a generator of that device.</summary>
    public bool DrawOnDevice { get; init; }

    public Tensor Ones(params long[] shape) => ones(shape, DType, Device);
    public Tensor Zeros(params long[] shape) => zeros(shape, DType, Device);
}
