using System.Text.RegularExpressions;
using MoeLora.Core.Modules;
using MoeLora.Sources.Safetensors;

namespace MoeLora.Sources.Analysis;

/// <summary>
/// A module tree reconstructed from checkpoint tensor names and shapes alone, for a <c>model_type</c> the analysis does
/// not know. It is labelled as derived everywhere: names are the checkpoint's, which transformers may rename or fuse
/// at run time, and every judgement beyond the rules below is listed in <see cref="Notes"/> rather than made silently.
/// </summary>
/// <param name="Tree">Modules and parameters as stored. Its <see cref="ModuleTree.Layout"/> is meaningless here.</param>
/// <param name="ModelType">The config's model_type, if any.</param>
/// <param name="NumLayers">Decoder layers found (<c>layers.&lt;i&gt;.</c>).</param>
/// <param name="NumExperts">Routed experts per MoE layer (largest count seen), 0 when none.</param>
/// <param name="MoeLayers">Layers that hold routed experts.</param>
/// <param name="Notes">Each inference that goes beyond the rules, one sentence each.</param>
public sealed record DerivedModel(
    ModuleTree Tree,
    string? ModelType,
    int NumLayers,
    long NumExperts,
    IReadOnlyList<int> MoeLayers,
    IReadOnlyList<string> Notes)
{
    /// <summary>The label every report of a derived model must carry.</summary>
    public const string Label = "derived from checkpoint headers: module names are the checkpoint's and may differ at run time";
}

/// <summary>
/// Builds a <see cref="DerivedModel"/> with these rules only: a 2-D <c>.weight</c> (with an optional 1-D <c>.bias</c>)
/// is a Linear layer (out, in); tensors under <c>experts.&lt;i&gt;.</c> are routed experts; a 3-D tensor under an
/// <c>experts</c> module is a fused experts parameter with E = its first dimension; <c>layers.&lt;i&gt;.</c> gives the
/// layer; a lone 1-D <c>.weight</c> is a norm. Embeddings, the output head, attention, routers and shared experts
/// are recognised by name, and each such call is reported in the notes.
/// </summary>
public static partial class CheckpointModelDeriver
{
    public static DerivedModel Derive(Checkpoint checkpoint, string? modelType)
    {
        var notes = new List<string> { $"model_type '{modelType ?? "(none)"}' is not known to MoeLora: the structure below is {DerivedModel.Label}" };
        var tensors = checkpoint.Tensors.Select(t => t.Tensor).OrderBy(t => t.Name, NaturalNameComparer.Instance).ToList();
        var byOwner = tensors.GroupBy(t => OwnerName(t.Name)).ToDictionary(g => g.Key, g => g.ToList(), StringComparer.Ordinal);

        var perLayerExperts = new Dictionary<int, long>();
        var embeddings = new List<string>();
        var heads = new List<string>();
        var routers = new List<string>();
        var fusedExperts = new List<string>();
        var others = new List<string>();

        var modules = new List<ModuleNode> { new("", "DerivedModel", ModuleKind.Container, ModuleLocation.Other, null) };
        var known = new Dictionary<string, ModuleNode>(StringComparer.Ordinal) { [""] = modules[0] };

        ModuleNode Ensure(string name, Func<ModuleNode> create)
        {
            if (known.TryGetValue(name, out ModuleNode? existing)) return existing;
            // Parents first, so the list reads like named_modules(): pre-order.
            string parent = OwnerName(name);
            if (parent != name) Ensure(parent, () => Container(parent));
            ModuleNode node = create();
            known[name] = node;
            modules.Add(node);
            return node;
        }

        // Expert counts first: a layer's expert count decides which Linear is its router.
        foreach (SafetensorsTensor t in tensors)
        {
            if (LayerIndex(t.Name) is not int layer) continue;
            long count = ExpertIndex(t.Name) is int e ? e + 1 : t.Shape.Count == 3 && Leaf(OwnerName(t.Name)) == "experts" ? t.Shape[0] : 0;
            if (count > 0) perLayerExperts[layer] = Math.Max(perLayerExperts.GetValueOrDefault(layer), count);
        }

        foreach ((string owner, List<SafetensorsTensor> owned) in byOwner.OrderBy(p => p.Key, NaturalNameComparer.Instance))
        {
            int? layer = LayerIndex(owner);
            SafetensorsTensor? weight = owned.FirstOrDefault(t => t.Name.EndsWith(".weight", StringComparison.Ordinal));
            ModuleNode node;
            if (weight is { Shape.Count: 2 })
            {
                string leaf = Leaf(owner);
                bool isEmbedding = EmbeddingName().IsMatch(leaf);
                long experts = layer is int l ? perLayerExperts.GetValueOrDefault(l) : 0;
                ModuleLocation location = isEmbedding ? ModuleLocation.Embedding : Locate(owner, weight.Shape[0], experts);
                if (isEmbedding) embeddings.Add(owner);
                if (location == ModuleLocation.LmHead) heads.Add(owner);
                if (location == ModuleLocation.Router) routers.Add(owner);
                node = Ensure(owner, () => new ModuleNode(owner, isEmbedding ? "Embedding" : "Linear", isEmbedding ? ModuleKind.Embedding : ModuleKind.Linear, location, layer)
                {
                    InFeatures = isEmbedding ? weight.Shape[0] : weight.Shape[1],
                    OutFeatures = isEmbedding ? weight.Shape[1] : weight.Shape[0],
                });
            }
            else if (owned.Any(t => t.Shape.Count == 3) && Leaf(owner) == "experts")
            {
                long e = owned.Where(t => t.Shape.Count == 3).Max(t => t.Shape[0]);
                fusedExperts.Add(owner);
                node = Ensure(owner, () => new ModuleNode(owner, "Experts", ModuleKind.Experts, ModuleLocation.RoutedExpert, layer) { NumExperts = e });
            }
            else if (owned.Count == 1 && weight is { Shape.Count: 1 })
            {
                node = Ensure(owner, () => new ModuleNode(owner, "Norm", ModuleKind.Norm, ModuleLocation.Norm, layer));
            }
            else
            {
                others.AddRange(owned.Select(t => t.Name));
                node = Ensure(owner, () => new ModuleNode(owner, "Module", ModuleKind.Other, Locate(owner, 0, 0), layer));
            }
            foreach (SafetensorsTensor t in owned)
                node.Parameters.Add(new ParameterNode(t.Name, t.Name[(t.Name.LastIndexOf('.') + 1)..], [.. t.Shape], null));
        }

        // An expert container's count is known only once all its children are seen.
        foreach (ModuleNode container in modules.Where(m => m.LeafName == "experts" && m.Kind == ModuleKind.Container).ToList())
        {
            int index = modules.IndexOf(container);
            long count = modules.Count(m => OwnerName(m.Name) == container.Name);
            modules[index] = new ModuleNode(container.Name, container.ClassName, container.Kind, ModuleLocation.RoutedExpert, container.LayerIndex) { NumExperts = count };
        }

        var layers = tensors.Select(t => LayerIndex(t.Name)).OfType<int>().Distinct().ToList();
        var moeLayers = perLayerExperts.Keys.Order().ToList();
        if (embeddings.Count > 0) notes.Add($"taken as embeddings by name, not as Linear layers: {string.Join(", ", embeddings)}");
        if (heads.Count > 0) notes.Add($"taken as the output head by name: {string.Join(", ", heads)}");
        else if (embeddings.Count > 0) notes.Add("no output head is stored: it is probably tied to the input embedding, or the model has none");
        if (routers.Count > 0) notes.Add($"{routers.Count} 2-D weights taken as routers (named gate/router, one output per expert), e.g. {routers[0]}; whether a router is an nn.Linear that all-linear would match cannot be told from the checkpoint");
        if (fusedExperts.Count > 0) notes.Add($"{fusedExperts.Count} fused 3-D expert tensors: E is their first dimension; whether they are stored (E, out, in) or (E, in, out) cannot be told from the checkpoint");
        if (others.Count > 0) notes.Add($"{others.Count} tensors fit no rule and are listed as plain parameters, e.g. {others[0]}");

        return new DerivedModel(new ModuleTree(modules, Layout.V4), modelType, layers.Count,
            perLayerExperts.Count == 0 ? 0 : perLayerExperts.Values.Max(), moeLayers, notes);
    }

    private static ModuleNode Container(string name) =>
        new(name, name.Length == 0 ? "DerivedModel" : "Module", ModuleKind.Container, Locate(name, 0, 0), LayerIndex(name));

    // Location by name; a router is a gate/router Linear whose outputs equal the layer's expert count.
    private static ModuleLocation Locate(string name, long outFeatures, long layerExperts)
    {
        string leaf = Leaf(name);
        if (ExpertIndex(name) is not null || Regex.IsMatch(name, @"(^|\.)experts($|\.)")) return ModuleLocation.RoutedExpert;
        if (layerExperts > 0 && outFeatures == layerExperts && RouterName().IsMatch(leaf)) return ModuleLocation.Router;
        if (name.Contains("shared_expert", StringComparison.Ordinal)) return ModuleLocation.SharedExpert;
        if (AttentionName().IsMatch(name)) return ModuleLocation.Attention;
        if (LayerIndex(name) is null && (leaf is "lm_head" or "output" or "embed_out")) return ModuleLocation.LmHead;
        if (LayerIndex(name) is not null && MlpName().IsMatch(name)) return ModuleLocation.Mlp;
        return ModuleLocation.Other;
    }

    private static int? LayerIndex(string name) => LayerPattern().Match(name) is { Success: true } m ? int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture) : null;

    private static int? ExpertIndex(string name) => ExpertPattern().Match(name) is { Success: true } m ? int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture) : null;

    private static string OwnerName(string name) => name.Contains('.', StringComparison.Ordinal) ? name[..name.LastIndexOf('.')] : "";

    private static string Leaf(string name) => name[(name.LastIndexOf('.') + 1)..];

    [GeneratedRegex(@"(?:^|\.)layers\.(\d+)(?:\.|$)")]
    private static partial Regex LayerPattern();

    [GeneratedRegex(@"(?:^|\.)experts\.(\d+)(?:\.|$)")]
    private static partial Regex ExpertPattern();

    [GeneratedRegex(@"^(embed_tokens|embeddings?|wte|wpe|tok_embeddings|word_embeddings)$")]
    private static partial Regex EmbeddingName();

    [GeneratedRegex(@"^(gate|router|gating|wg)$")]
    private static partial Regex RouterName();

    [GeneratedRegex(@"(^|\.)(self_attn|attn|attention|self_attention)(\.|$)")]
    private static partial Regex AttentionName();

    [GeneratedRegex(@"(^|\.)(mlp|feed_forward|ffn|block_sparse_moe|moe)(\.|$)")]
    private static partial Regex MlpName();
}

/// <summary>Orders dotted names with numeric segments as numbers (layers.2 before layers.10).</summary>
internal sealed class NaturalNameComparer : IComparer<string>
{
    public static readonly NaturalNameComparer Instance = new();

    public int Compare(string? x, string? y)
    {
        string[] a = (x ?? "").Split('.'), b = (y ?? "").Split('.');
        for (int i = 0; i < Math.Min(a.Length, b.Length); i++)
        {
            int c = long.TryParse(a[i], out long na) && long.TryParse(b[i], out long nb) ? na.CompareTo(nb) : string.CompareOrdinal(a[i], b[i]);
            if (c != 0) return c;
        }
        return a.Length.CompareTo(b.Length);
    }
}
