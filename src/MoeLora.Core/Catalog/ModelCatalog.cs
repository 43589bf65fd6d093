using System.Reflection;
using System.Text.Json.Nodes;

namespace MoeLora.Core.Catalog;

/// <summary>One real config.json shipped inside the tool, addressed by its Hub id.</summary>
/// <param name="Id">Hub id, e.g. <c>mistralai/Mixtral-8x7B-v0.1</c>.</param>
/// <param name="Partial">True when the published file is known to lack fields (see SOURCES.md).</param>
/// <param name="Note">Why it is partial, or null.</param>
public sealed record CatalogEntry(string Id, bool Partial, string? Note);

/// <summary>
/// The embedded catalog of real <c>config.json</c> files (Catalog/configs, provenance in Catalog/SOURCES.md).
/// Files are named <c>org__name.json</c>; the Hub id is <c>org/name</c>.
/// </summary>
public static class ModelCatalog
{
    /// <summary>The model the README's first command analyses.</summary>
    public const string DefaultModelId = "meta-llama/Llama-4-Scout-17B-16E-Instruct";

    private const string ResourcePrefix = "catalog/";

    // SOURCES.md marks these as partial copies; the note says what is missing.
    private static readonly Dictionary<string, string> PartialNotes = new(StringComparer.OrdinalIgnoreCase)
    {
        ["meta-llama/Llama-4-Scout-17B-16E-Instruct"] =
            "text_config lacks bos/eos/pad token ids, initializer_range and router_jitter_noise; architecture fields are exact",
        ["meta-llama/Llama-4-Maverick-17B-128E-Instruct"] =
            "text_config lacks bos/eos/pad token ids, initializer_range and router_jitter_noise; architecture fields are exact",
    };

    private static readonly Lazy<IReadOnlyList<CatalogEntry>> LazyEntries = new(LoadEntries);

    /// <summary>Every catalog model, sorted by id.</summary>
    public static IReadOnlyList<CatalogEntry> Entries => LazyEntries.Value;

    /// <summary>Returns the raw config.json text of a catalog model (id compared case-insensitively).</summary>
    public static bool TryGetConfigJson(string id, out string json)
    {
        json = "";
        var entry = Entries.FirstOrDefault(e => string.Equals(e.Id, id, StringComparison.OrdinalIgnoreCase));
        if (entry is null) return false;
        using var stream = typeof(ModelCatalog).Assembly.GetManifestResourceStream(ResourcePrefix + ToFileName(entry.Id) + ".json")!;
        using var reader = new StreamReader(stream);
        json = reader.ReadToEnd();
        return true;
    }

    /// <summary>Parses a catalog config, or returns null when the id is not in the catalog.</summary>
    public static JsonObject? TryGetConfig(string id) =>
        TryGetConfigJson(id, out var json) ? JsonNode.Parse(json)!.AsObject() : null;

    /// <summary>The canonical id of a catalog entry (fixes case), or null.</summary>
    public static CatalogEntry? Find(string id) =>
        Entries.FirstOrDefault(e => string.Equals(e.Id, id, StringComparison.OrdinalIgnoreCase));

    private static string ToFileName(string id) => id.Replace("/", "__", StringComparison.Ordinal);

    private static IReadOnlyList<CatalogEntry> LoadEntries()
    {
        Assembly assembly = typeof(ModelCatalog).Assembly;
        return assembly.GetManifestResourceNames()
            .Where(n => n.StartsWith(ResourcePrefix, StringComparison.Ordinal) && n.EndsWith(".json", StringComparison.Ordinal))
            .Select(n => n[ResourcePrefix.Length..^".json".Length].Replace("__", "/", StringComparison.Ordinal))
            .OrderBy(id => id, StringComparer.OrdinalIgnoreCase)
            .Select(id => new CatalogEntry(id, PartialNotes.ContainsKey(id), PartialNotes.GetValueOrDefault(id)))
            .ToList();
    }
}
