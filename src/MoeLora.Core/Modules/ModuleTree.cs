namespace MoeLora.Core.Modules;

/// <summary>One entry of <c>named_parameters()</c> (or a tied weight that it omits).</summary>
/// <param name="Name">Full dotted name, e.g. <c>model.layers.0.self_attn.q_proj.weight</c>.</param>
/// <param name="LocalName">The attribute name on its module, e.g. <c>weight</c> or <c>gate_up_proj</c>.</param>
/// <param name="Shape">torch shape.</param>
/// <param name="TiedTo">For a tied weight: the name of the parameter it is (then absent from named_parameters).</param>
public sealed record ParameterNode(string Name, string LocalName, long[] Shape, string? TiedTo)
{
    public long NumElements => Util.Shapes.Product(Shape);

    public bool IsTied => TiedTo is not null;

    public string ShapeText => "[" + string.Join(", ", Shape) + "]";
}

/// <summary>One entry of <c>named_modules()</c>.</summary>
public sealed class ModuleNode
{
    public ModuleNode(string name, string className, ModuleKind kind, ModuleLocation location, int? layerIndex)
    {
        Name = name;
        ClassName = className;
        Kind = kind;
        Location = location;
        LayerIndex = layerIndex;
    }

    public string Name { get; }

    /// <summary>The Python class name transformers uses (<c>Linear</c>, <c>MixtralExperts</c>, ...).</summary>
    public string ClassName { get; }

    public ModuleKind Kind { get; }

    public ModuleLocation Location { get; }

    /// <summary>The decoder (or vision encoder) layer this module belongs to, if any.</summary>
    public int? LayerIndex { get; }

    /// <summary>Direct parameters in registration order (tied ones included, flagged).</summary>
    public List<ParameterNode> Parameters { get; } = [];

    /// <summary>
    /// Persistent buffers (e.g. a router's <c>e_score_correction_bias</c>): not parameters, but written by
    /// <c>save_pretrained</c>. Families declare them where the checkpoint layout renames them, so that layout is
    /// complete; <see cref="ParameterNode.TiedTo"/> is always null here.
    /// </summary>
    public List<ParameterNode> Buffers { get; } = [];

    /// <summary>For Linear: in_features; for Embedding: num_embeddings.</summary>
    public long InFeatures { get; init; }

    /// <summary>For Linear: out_features; for Embedding: embedding_dim.</summary>
    public long OutFeatures { get; init; }

    /// <summary>
    /// For a fused experts module: transformers marks it <c>is_transposed</c> (parameters stored (E, in, out)), which
    /// decides PEFT's LoRA orientation. gpt-oss sets it; Llama 4 stores (E, in, out) too but has no such attribute.
    /// </summary>
    public bool IsTransposed { get; init; }

    /// <summary>Number of routed experts held by an experts module (0 otherwise).</summary>
    public long NumExperts { get; init; }

    /// <summary>The last dotted segment (<c>q_proj</c>), or "" for the root.</summary>
    // Made once per module: the memory model and the findings compare leaf names of every module many times.
    public string LeafName => _leafName ??= Name.Length == 0 ? "" : Name[(Name.LastIndexOf('.') + 1)..];

    private string? _leafName;

    public ParameterNode? Parameter(string localName) => Parameters.FirstOrDefault(p => p.LocalName == localName);

    public override string ToString() => $"{Name} ({ClassName})";
}

/// <summary>
/// The single source of names and shapes: what <c>named_modules()</c> and <c>named_parameters()</c> return for a
/// model built from a config. Everything else (PEFT planning, memory, the TorchSharp runtime) reads this.
/// </summary>
public sealed class ModuleTree
{
    private readonly Dictionary<string, ModuleNode> _byName;

    public ModuleTree(IReadOnlyList<ModuleNode> modules, Layout layout)
    {
        Modules = modules;
        Layout = layout;
        _byName = new Dictionary<string, ModuleNode>(modules.Count, StringComparer.Ordinal);
        foreach (var m in modules) _byName[m.Name] = m;
        Parameters = modules.SelectMany(m => m.Parameters).Where(p => !p.IsTied).ToList();
        NumParameters = Parameters.Sum(p => p.NumElements);
        Buffers = modules.SelectMany(m => m.Buffers).ToList();
    }

    public Layout Layout { get; }

    /// <summary>named_modules() order, root first (name "").</summary>
    public IReadOnlyList<ModuleNode> Modules { get; }

    /// <summary>named_parameters() order; tied weights appear once (under their first name).</summary>
    public IReadOnlyList<ParameterNode> Parameters { get; }

    public long NumParameters { get; }

    /// <summary>The persistent buffers families declare (see <see cref="ModuleNode.Buffers"/>), in module order.</summary>
    public IReadOnlyList<ParameterNode> Buffers { get; }

    public ModuleNode Root => Modules[0];

    public ModuleNode? Find(string name) => _byName.GetValueOrDefault(name);

    /// <summary>The module holding a parameter (its name without the last segment).</summary>
    public ModuleNode OwnerOf(ParameterNode parameter) =>
        _byName[parameter.Name.Length == parameter.LocalName.Length ? "" : parameter.Name[..(parameter.Name.Length - parameter.LocalName.Length - 1)]];

    /// <summary>Every parameter of a module and its descendants, tied ones included (a deep copy owns them all).</summary>
    public IEnumerable<ParameterNode> SubtreeParameters(ModuleNode module)
    {
        var prefix = module.Name.Length == 0 ? "" : module.Name + ".";
        return Modules.Where(m => m == module || m.Name.StartsWith(prefix, StringComparison.Ordinal)).SelectMany(m => m.Parameters);
    }
}
