using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Sources;

namespace MoeLora.Cli.Infrastructure;

/// <summary>Turns the MODEL argument into a built model: resolve the config (local, cache, Hub, catalog), then build.</summary>
public static class ModelLoader
{
    /// <summary>Tests and embedders may replace how sources are configured (e.g. a loopback Hub).</summary>
    public static Func<SourceSettings> Settings { get; set; } = SourceSettings.FromEnvironment;

    /// <summary>One short line about where the config came from (the full notes go to JSON).</summary>
    public static string? Summary(ResolvedModel resolved)
    {
        if (resolved.Origin != ModelOrigin.Catalog) return resolved.Commit is null ? null : $"commit {resolved.Commit}";
        var entry = MoeLora.Core.Catalog.ModelCatalog.Find(resolved.Id);
        return "embedded copy" + (entry?.Partial == true ? $" (partial: {entry.Note})" : "");
    }

    public static (ModelSpec Spec, ResolvedModel Resolved) Load(string model, Layout layout, string revision)
    {
        using var resolver = new ModelResolver(Settings());
        var resolved = resolver.Resolve(model, new ResolveOptions { Revision = revision });
        var config = ModelConfig.Parse(resolved.ConfigJson, $"config.json of {resolved.Id}");
        return (ArchitectureRegistry.Build(config, layout), resolved);
    }
}
