using MoeLora.Core.Modules;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// A multimodal model's vision/audio tower or projector, built straight from Core's module tree under one prefix and
/// never run: transformers, given only input_ids, never calls it, so the text-only forward needs none. Its Linear nodes
/// are real <see cref="Linear"/> modules (LoRA targets PEFT puts there are injected, counted, saved and loaded like any
/// other); every other parameter and buffer is a plain tensor of Core's shape, so checkpoints fill it by name. One
/// class serves every family: what the tower holds is Core's tree, not code here.
/// </summary>
public sealed class InertTower : HfModule, IInertNode
{
    /// <summary>What running any tower (pixel or audio inputs) reports.</summary>
    public const string TextOnlyMessage = "MoeLora's runtime runs text only: pixel/audio inputs are not supported";

    public string Prefix { get; }

    InertTower(string prefix) => Prefix = prefix;

    /// <summary>The subtree of <paramref name="tree"/> at <paramref name="prefix"/> (a module name of the tree).</summary>
    public static InertTower Build(ModuleTree tree, string prefix, Init init)
    {
        var root = tree.Find(prefix) ?? throw new InvalidOperationException($"Core's tree has no module '{prefix}' to build a tower from.");
        // Direct children by parent name, in named_modules order (the tree lists modules pre-order).
        var children = new Dictionary<string, List<ModuleNode>>(StringComparer.Ordinal);
        var under = prefix + ".";
        foreach (var m in tree.Modules)
        {
            if (!m.Name.StartsWith(under, StringComparison.Ordinal)) continue;
            var parent = m.Name[..m.Name.LastIndexOf('.')];
            if (!children.TryGetValue(parent, out var list)) children[parent] = list = [];
            list.Add(m);
        }
        var tower = new InertTower(prefix);
        Fill(tower, root, children, init);
        return tower;
    }

    /// <summary>
    /// The initial value of a bare parameter of <paramref name="tree"/> (a model's own Parameter beside its towers, e.g.
    /// DeepSeek-OCR-2's <c>model.view_separator</c>, which only image features use), by its full name.
    /// </summary>
    public static Tensor BareParameter(ModuleTree tree, string path, Init init)
    {
        var p = tree.Parameters.FirstOrDefault(x => x.Name == path)
            ?? throw new InvalidOperationException($"Core's tree has no module or parameter '{path}' to build a tower from.");
        var dot = path.LastIndexOf('.');
        var owner = tree.Find(dot < 0 ? "" : path[..dot])
            ?? throw new InvalidOperationException($"Core's tree has no module owning '{path}'.");
        return Initial(owner, p, init);
    }

    /// <summary>Refuses: the runtime has no tower forward (pixel_values / audio inputs are not supported).</summary>
    public Tensor Forward(Tensor inputs) => throw new NotSupportedException(TextOnlyMessage + $" ({Prefix} is built but never run).");

    static void Fill(HfModule into, ModuleNode node, Dictionary<string, List<ModuleNode>> children, Init init)
    {
        var target = (IInertNode)into;
        foreach (var p in node.Parameters)
        {
            if (p.IsTied) throw new NotSupportedException($"tower parameter {p.Name} is tied to {p.TiedTo}; inert towers hold untied parameters only.");
            target.Param(p.LocalName, Initial(node, p, init));
        }
        foreach (var b in node.Buffers) target.Buffer(b.LocalName, init.Zeros(b.Shape));
        foreach (var child in children.GetValueOrDefault(node.Name) ?? [])
        {
            if (child.Kind == ModuleKind.Linear)
            {
                // nn.Linear (or a subclass): PEFT's lora.Linear target, so a real Linear that adapters attach to.
                var bias = child.Parameter("bias") is not null;
                if (child.Parameters.Count != (bias ? 2 : 1) || child.Parameter("weight") is not { } w || !w.Shape.SequenceEqual([child.OutFeatures, child.InFeatures]))
                    throw new NotSupportedException($"tower module {child.Name} is not a plain Linear in Core's tree.");
                target.Child(child.LeafName, new Linear(child.InFeatures, child.OutFeatures, bias, init));
                continue;
            }
            var module = new InertModule();
            target.Child(child.LeafName, module);
            Fill(module, child, children, init);
        }
    }

    // Never run, so values matter only for a seeded random model: norms as their modules initialise them, else normal.
    static Tensor Initial(ModuleNode owner, ParameterNode p, Init init) =>
        p.LocalName == "bias" ? init.Zeros(p.Shape)
        : owner.Kind == ModuleKind.Norm && p.LocalName == "weight" ? init.Ones(p.Shape)
        : init.Normal(p.Shape);

    void IInertNode.Param(string name, Tensor value) => AddParameter(name, value);
    void IInertNode.Buffer(string name, Tensor value) => AddBuffer(name, value);
    void IInertNode.Child(string name, HfModule module) => AddChild(name, module);
}

/// <summary>A module inside an <see cref="InertTower"/>: Core's parameters and children, no forward.</summary>
public sealed class InertModule : HfModule, IInertNode
{
    void IInertNode.Param(string name, Tensor value) => AddParameter(name, value);
    void IInertNode.Buffer(string name, Tensor value) => AddBuffer(name, value);
    void IInertNode.Child(string name, HfModule module) => AddChild(name, module);
}

interface IInertNode
{
    void Param(string name, Tensor value);
    void Buffer(string name, Tensor value);
    void Child(string name, HfModule module);
}
