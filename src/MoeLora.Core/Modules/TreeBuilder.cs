namespace MoeLora.Core.Modules;

/// <summary>
/// Builds a <see cref="ModuleTree"/> the way <c>nn.Module.__init__</c> registers children: modules are appended in
/// assignment order under the current scope, and each parameter is attached to the module that owns it, so
/// <c>named_parameters()</c> order falls out of <c>named_modules()</c> order.
/// </summary>
public sealed class TreeBuilder
{
    private readonly List<ModuleNode> _modules = [];
    private readonly Stack<ModuleNode> _scopes = new();
    private readonly Layout _layout;

    public TreeBuilder(string rootClass, Layout layout)
    {
        _layout = layout;
        var root = new ModuleNode("", rootClass, ModuleKind.Container, ModuleLocation.Other, null);
        _modules.Add(root);
        _scopes.Push(root);
    }

    private ModuleNode Current => _scopes.Peek();

    private string Qualify(string localName) => Current.Name.Length == 0 ? localName : Current.Name + "." + localName;

    /// <summary>Adds a module under the current scope. Location and layer are inherited unless given.</summary>
    public ModuleNode Add(string localName, string className, ModuleKind kind = ModuleKind.Container,
        ModuleLocation? location = null, int? layer = null, long inFeatures = 0, long outFeatures = 0,
        bool isTransposed = false, long numExperts = 0)
    {
        var node = new ModuleNode(Qualify(localName), className, kind, location ?? Current.Location, layer ?? Current.LayerIndex)
        {
            InFeatures = inFeatures,
            OutFeatures = outFeatures,
            IsTransposed = isTransposed,
            NumExperts = numExperts,
        };
        _modules.Add(node);
        return node;
    }

    /// <summary>Adds a module and makes it the current scope until the returned handle is disposed.</summary>
    public IDisposable Scope(string localName, string className, ModuleLocation? location = null, int? layer = null,
        ModuleKind kind = ModuleKind.Container, long numExperts = 0, bool isTransposed = false)
    {
        var node = Add(localName, className, kind, location, layer, numExperts: numExperts, isTransposed: isTransposed);
        _scopes.Push(node);
        return new PopOnDispose(this);
    }

    /// <summary>Registers a parameter on the current scope's module.</summary>
    public void Param(string localName, params long[] shape) => AddParam(Current, localName, shape, null);

    /// <summary>Registers a persistent buffer (written by save_pretrained, not a parameter) on the current scope's module.</summary>
    public void Buffer(string localName, params long[] shape)
    {
        var owner = Current;
        owner.Buffers.Add(new ParameterNode(owner.Name.Length == 0 ? localName : owner.Name + "." + localName, localName, shape, null));
    }

    /// <summary>nn.Linear(in, out, bias): weight [out, in] (+ bias [out]).</summary>
    public ModuleNode Linear(string localName, long inFeatures, long outFeatures, bool bias = false,
        string className = "Linear", ModuleLocation? location = null, string? tiedWeightTo = null)
    {
        var node = Add(localName, className, ModuleKind.Linear, location, inFeatures: inFeatures, outFeatures: outFeatures);
        AddParam(node, "weight", [outFeatures, inFeatures], tiedWeightTo);
        if (bias) AddParam(node, "bias", [outFeatures], null);
        return node;
    }

    /// <summary>nn.Embedding(num, dim): weight [num, dim].</summary>
    public ModuleNode Embedding(string localName, long num, long dim, ModuleLocation location = ModuleLocation.Embedding)
    {
        var node = Add(localName, "Embedding", ModuleKind.Embedding, location, inFeatures: num, outFeatures: dim);
        AddParam(node, "weight", [num, dim], null);
        return node;
    }

    /// <summary>An RMSNorm-style module with a single weight [n].</summary>
    public ModuleNode RmsNorm(string localName, string className, long n, ModuleLocation? location = null)
    {
        var node = Add(localName, className, ModuleKind.Norm, location);
        AddParam(node, "weight", [n], null);
        return node;
    }

    /// <summary>nn.LayerNorm(n): weight [n] (+ bias [n]).</summary>
    public ModuleNode LayerNorm(string localName, long n, bool bias = true, string className = "LayerNorm", ModuleLocation? location = null)
    {
        var node = Add(localName, className, ModuleKind.Norm, location);
        AddParam(node, "weight", [n], null);
        if (bias) AddParam(node, "bias", [n], null);
        return node;
    }

    /// <summary>A parameter-less module (activation, rotary embedding, L2 norm, unfold).</summary>
    public ModuleNode Leaf(string localName, string className) => Add(localName, className);

    /// <summary>Opens <c>name</c> as an <c>nn.ModuleList</c> and calls <paramref name="item"/> for each index.</summary>
    public void ModuleList(string localName, long count, Action<int> item)
    {
        using (Scope(localName, "ModuleList"))
        {
            for (var i = 0; i < count; i++) item(i);
        }
    }

    public ModuleTree Build() => new(_modules, _layout);

    private static void AddParam(ModuleNode owner, string localName, long[] shape, string? tiedTo)
    {
        var full = owner.Name.Length == 0 ? localName : owner.Name + "." + localName;
        owner.Parameters.Add(new ParameterNode(full, localName, shape, tiedTo));
    }

    private sealed class PopOnDispose(TreeBuilder builder) : IDisposable
    {
        private bool _done;

        public void Dispose()
        {
            if (_done) return;
            _done = true;
            builder._scopes.Pop();
        }
    }
}
