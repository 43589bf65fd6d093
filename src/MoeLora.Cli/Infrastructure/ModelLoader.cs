using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Sources;
using MoeLora.Sources.Analysis;

namespace MoeLora.Cli.Infrastructure;

/// <summary>A model ready for analysis, with what its checkpoint says when one was read.</summary>
/// <param name="CrossCheck">The analysis checked against the checkpoint headers (null when none were read).</param>
/// <param name="Derived">Set when the model_type is unknown and the tree was derived from the checkpoint headers.</param>
/// <param name="CheckpointError">Why the checkpoint headers could not be read (the config-only analysis still runs).</param>
public sealed record LoadedModel(ModelSpec Spec, ResolvedModel Resolved, CrossCheckReport? CrossCheck, DerivedModel? Derived,
    string? CheckpointError = null);

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

    /// <summary>
    /// Like <see cref="Load"/>, and when checkpoint headers are at hand (a local folder or the HF cache; the Hub only
    /// when <paramref name="readRemoteHeaders"/>) checks the analysis against them. An unknown model_type with a
    /// checkpoint is analysed from the headers alone, labelled as derived.
    /// </summary>
    public static LoadedModel LoadChecked(string model, Layout layout, string revision, bool readRemoteHeaders)
    {
        using var resolver = new ModelResolver(Settings());
        var resolved = resolver.Resolve(model, new ResolveOptions { Revision = revision });
        var config = ModelConfig.Parse(resolved.ConfigJson, $"config.json of {resolved.Id}");
        var canRead = resolved.Origin is ModelOrigin.Local or ModelOrigin.Cache || (readRemoteHeaders && resolved.Origin == ModelOrigin.Hub);
        Sources.Safetensors.Checkpoint? checkpoint = null;
        string? checkpointError = null;
        try
        {
            checkpoint = canRead ? resolver.ReadCheckpoint(resolved) : null;
        }
        catch (Exception e) when (e is ModelSourceException or IOException)
        {
            // A broken checkpoint does not stop a config-only analysis; it is reported next to it.
            checkpointError = e.Message;
        }
        ModelSpec spec;
        try
        {
            spec = ArchitectureRegistry.Build(config, layout);
        }
        catch (ConfigException) when (checkpoint is not null && config.ModelType is { } type && !ArchitectureRegistry.IsSupported(type))
        {
            var derived = CheckpointModelDeriver.Derive(checkpoint, type);
            return new LoadedModel(DerivedSpec.From(derived, config), resolved, null, derived);
        }
        return new LoadedModel(spec, resolved, checkpoint is null ? null : CheckpointCrossCheck.Run(spec, checkpoint), null, checkpointError);
    }
}
