using System.Text.Json;
using MoeLora.Core.Catalog;
using MoeLora.Sources.Cache;
using MoeLora.Sources.Hub;
using MoeLora.Sources.Safetensors;

namespace MoeLora.Sources;

/// <summary>
/// Finds a model's config.json (and, on request, its checkpoint headers). A MODEL string is tried, in order, as:
/// <list type="number">
/// <item>a local path: a folder containing config.json, or a .json file;</item>
/// <item>a Hub id in the HF cache: <c>refs/{revision}</c> → <c>snapshots/{commit}/config.json</c> (no request);</item>
/// <item>a Hub id on the Hub (<see cref="SourceSettings.Endpoint"/>), through plain resolve URLs, stored in the
/// cache as huggingface_hub stores it; skipped when <see cref="SourceSettings.Offline"/>;</item>
/// <item>the embedded catalog, when offline or when the Hub could not provide the file (a note says why).</item>
/// </list>
/// Errors are <see cref="ModelSourceException"/>s whose message is fit to show as is.
/// </summary>
public sealed class ModelResolver : IDisposable
{
    private const string ConfigFileName = "config.json";

    private readonly SourceSettings _settings;
    private readonly HubCache _cache;
    private readonly Lazy<HubClient> _client;

    public ModelResolver(SourceSettings settings)
    {
        _settings = settings;
        _cache = new HubCache(settings.HubCache, settings.DisableSymlinks);
        _client = new Lazy<HubClient>(() => new HubClient(settings));
    }

    /// <summary>Resolves MODEL synchronously (for the CLI); see <see cref="ResolveAsync"/>.</summary>
    public ResolvedModel Resolve(string model, ResolveOptions? options = null) =>
        ResolveAsync(model, options).GetAwaiter().GetResult();

    /// <summary>Finds MODEL's config.json in the order described on <see cref="ModelResolver"/>.</summary>
    public async Task<ResolvedModel> ResolveAsync(string model, ResolveOptions? options = null, CancellationToken cancellationToken = default)
    {
        options ??= ResolveOptions.Default;
        if (string.IsNullOrWhiteSpace(model))
            throw new ModelSourceException("no model given: pass a Hub id (org/name) or a folder containing config.json.");

        if (TryResolveLocal(model) is { } local) return local;
        if (LooksLikePath(model))
            throw new ModelSourceException($"{model} does not exist (it looks like a path, so it was not looked up on the Hub).");
        if (!RepoId.TryParse(model, out RepoId repo))
            throw new ModelSourceException($"'{model}' is neither an existing path nor a valid Hub id (org/name).");
        string revision = options.Revision;
        if (!HubCache.IsSafeRevision(revision))
            throw new ModelSourceException($"'{revision}' is not a valid revision (a branch, tag or commit hash).");

        if (_cache.TryFindFile(repo, revision, ConfigFileName, out string? commit) is { } cached)
        {
            return new ResolvedModel(repo.Value, ReadConfig(cached), ModelOrigin.Cache, revision, commit,
                Path.GetDirectoryName(cached), []);
        }

        var notes = new List<string>();
        if (_settings.Offline)
        {
            notes.Add($"HF_HUB_OFFLINE is set and {repo} (revision {revision}) is not in the HF cache at {_settings.HubCache}");
        }
        else
        {
            try
            {
                var downloader = new HubDownloader(_client.Value, _cache, _settings);
                DownloadedText? config = await downloader.TryDownloadTextAsync(new HubFile(repo, revision, ConfigFileName), cancellationToken);
                if (config is null)
                    throw new HubException(HubErrorKind.EntryNotFound, $"model {repo} has no config.json at revision {revision} on {_settings.Endpoint}.");
                CheckConfig(config.Text, $"{_settings.Endpoint}/{repo}/{ConfigFileName}");
                if (config.Note is not null) notes.Add(config.Note);
                return new ResolvedModel(repo.Value, config.Text, ModelOrigin.Hub, revision, config.Commit,
                    config.CachedPath is null ? null : Path.GetDirectoryName(config.CachedPath), notes);
            }
            catch (HubException ex) when (options.UseCatalog && ModelCatalog.Find(repo.Value) is not null)
            {
                notes.Add($"the Hub could not provide it ({ex.Message.TrimEnd('.')})");
            }
        }

        if (options.UseCatalog && ModelCatalog.Find(repo.Value) is { } entry && ModelCatalog.TryGetConfigJson(entry.Id, out string json))
        {
            notes.Add($"using MoeLora's embedded copy of {entry.Id}'s config.json" + (revision == "main" ? "" : $", which is not tied to revision {revision}"));
            if (entry.Partial) notes.Add($"the embedded copy is partial: {entry.Note}");
            return new ResolvedModel(entry.Id, json, ModelOrigin.Catalog, null, null, null, notes);
        }
        throw new ModelSourceException(options.UseCatalog ? $"{notes[0]}, and it is not in MoeLora's embedded catalog." : $"{notes[0]}.");
    }

    /// <summary>
    /// Downloads a Hub model's files into the HF cache exactly as huggingface_hub stores them, so that afterwards
    /// <see cref="Resolve"/> finds it in the cache and <see cref="ResolvedModel.Directory"/> holds config, tokenizer and
    /// weights. Fetched by default: config.json (required), generation_config.json, tokenizer.json,
    /// tokenizer_config.json, special_tokens_map.json (each if present), and model.safetensors or
    /// model.safetensors.index.json with every shard it names; <see cref="DownloadOptions.Include"/> narrows or
    /// extends that list. Every file comes from one commit; files already in the snapshot cost no request, blobs
    /// already in the cache are linked, and an interrupted transfer leaves nothing in the cache (run it again to
    /// fetch what is still missing).
    /// </summary>
    /// <exception cref="ModelSourceException">Offline, not a Hub id, gated, missing, no safetensors weights, network failures.</exception>
    public async Task<DownloadResult> DownloadAsync(string model, DownloadOptions? options = null, CancellationToken cancellationToken = default)
    {
        options ??= DownloadOptions.Default;
        if (string.IsNullOrWhiteSpace(model))
            throw new ModelSourceException("no model given: pass a Hub id (org/name).");
        if (LooksLikePath(model) || Directory.Exists(model) || File.Exists(model))
            throw new ModelSourceException($"{model} is a path; download takes a Hub id (org/name), and a local folder needs no download.");
        if (!RepoId.TryParse(model, out RepoId repo))
            throw new ModelSourceException($"'{model}' is not a valid Hub id (org/name).");
        if (!HubCache.IsSafeRevision(options.Revision))
            throw new ModelSourceException($"'{options.Revision}' is not a valid revision (a branch, tag or commit hash).");
        if (_settings.Offline)
            throw new ModelSourceException($"HF_HUB_OFFLINE is set, so {repo} cannot be downloaded: unset HF_HUB_OFFLINE (models already in the HF cache at {_settings.HubCache} work offline).");

        var downloader = new HubDownloader(_client.Value, _cache, _settings);
        return await new HubSnapshotDownloader(_client.Value, downloader, _cache).DownloadAsync(repo, options, cancellationToken);
    }

    /// <summary>Synchronous <see cref="DownloadAsync"/>.</summary>
    public DownloadResult Download(string model, DownloadOptions? options = null) => DownloadAsync(model, options).GetAwaiter().GetResult();

    /// <summary>
    /// Reads the safetensors headers of a resolved model's checkpoint (never the weights): from its folder, and for
    /// Hub models from the Hub with Range requests for any file not on disk. Returns null when there is no
    /// safetensors checkpoint to read (catalog models, folders without one, offline without the files).
    /// </summary>
    public async Task<Checkpoint?> ReadCheckpointAsync(ResolvedModel model, CancellationToken cancellationToken = default)
    {
        var stores = new List<ICheckpointStore>();
        if (model.Directory is not null) stores.Add(new DirectoryCheckpointStore(model.Directory));
        if (model.Origin is ModelOrigin.Cache or ModelOrigin.Hub && !_settings.Offline && RepoId.TryParse(model.Id, out RepoId repo))
        {
            // Pin to the commit the config came from, so config and weights belong together.
            string revision = model.Commit ?? model.Revision ?? "main";
            var downloader = new HubDownloader(_client.Value, _cache, _settings);
            stores.Add(new HubCheckpointStore(_client.Value, downloader, _cache, repo, revision, _settings.HeaderProbeBytes));
        }
        if (stores.Count == 0) return null;
        ICheckpointStore store = stores.Count == 1 ? stores[0] : new LayeredCheckpointStore([.. stores]);
        return await CheckpointReader.TryReadAsync(store, _settings.HeaderProbeBytes, _settings.Progress, cancellationToken);
    }

    /// <summary>Synchronous <see cref="ReadCheckpointAsync"/> for the CLI.</summary>
    public Checkpoint? ReadCheckpoint(ResolvedModel model) => ReadCheckpointAsync(model).GetAwaiter().GetResult();

    private static ResolvedModel? TryResolveLocal(string model)
    {
        string path = Path.GetFullPath(model);
        if (Directory.Exists(path))
        {
            string config = Path.Combine(path, ConfigFileName);
            if (!File.Exists(config))
                throw new ModelSourceException($"the folder {path} has no config.json.");
            return new ResolvedModel(path, ReadConfig(config), ModelOrigin.Local, null, null, path, []);
        }
        if (File.Exists(path))
        {
            if (!path.EndsWith(".json", StringComparison.OrdinalIgnoreCase))
                throw new ModelSourceException($"{path} is not a config.json file: pass the model folder or its config.json.");
            return new ResolvedModel(path, ReadConfig(path), ModelOrigin.Local, null, null, Path.GetDirectoryName(path), []);
        }
        return null;
    }

    // Anything a user would only type as a path; such strings are never sent to the Hub.
    private static bool LooksLikePath(string model) =>
        model.StartsWith('.') || model.StartsWith('/') || model.StartsWith('~') || model.Contains('\\', StringComparison.Ordinal)
        || model.EndsWith(".json", StringComparison.OrdinalIgnoreCase) || model.Count(c => c == '/') > 1;

    private static string ReadConfig(string path)
    {
        string text;
        try
        {
            text = File.ReadAllText(path);
        }
        catch (Exception ex) when (ex is IOException or UnauthorizedAccessException)
        {
            throw new ModelSourceException($"cannot read {path}: {ex.Message}", ex);
        }
        CheckConfig(text, path);
        return text;
    }

    private static void CheckConfig(string text, string source)
    {
        try
        {
            using JsonDocument document = JsonDocument.Parse(text);
            if (document.RootElement.ValueKind != JsonValueKind.Object)
                throw new ModelSourceException($"{source} is not a JSON object, so it is not a model config.");
        }
        catch (JsonException ex)
        {
            throw new ModelSourceException($"{source} is not valid JSON: {MoeLora.Core.Util.UserJson.Describe(ex)}", ex);
        }
    }

    public void Dispose()
    {
        if (_client.IsValueCreated) _client.Value.Dispose();
    }
}
