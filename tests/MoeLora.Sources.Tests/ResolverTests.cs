using MoeLora.Sources.Tests.Support;

namespace MoeLora.Sources.Tests;

/// <summary>Resolution without the network: local paths, the HF cache, offline mode, the catalog.</summary>
public class ResolverTests
{
    private const string Commit = "0123456789abcdef0123456789abcdef01234567";

    [Fact]
    public void A_folder_with_config_json_is_local()
    {
        using var cache = new TempDir();
        string folder = TestEnv.TinyDir("mixtral");
        using var resolver = new ModelResolver(TestEnv.Settings(cache.Path));

        ResolvedModel model = resolver.Resolve(folder);

        Assert.Equal(ModelOrigin.Local, model.Origin);
        Assert.Equal("local", model.OriginName);
        Assert.Equal(File.ReadAllText(Path.Combine(folder, "config.json")), model.ConfigJson);
        Assert.Equal(Path.GetFullPath(folder), model.Directory);
    }

    [Fact]
    public void A_config_json_path_is_local()
    {
        using var cache = new TempDir();
        string file = Path.Combine(TestEnv.TinyDir("qwen3"), "config.json");
        using var resolver = new ModelResolver(TestEnv.Settings(cache.Path));

        ResolvedModel model = resolver.Resolve(file);

        Assert.Equal(ModelOrigin.Local, model.Origin);
        Assert.Equal(TestEnv.TinyDir("qwen3"), model.Directory);
    }

    [Fact]
    public void A_folder_without_config_json_is_an_error()
    {
        using var dir = new TempDir();
        using var resolver = new ModelResolver(TestEnv.Settings(dir.Path));
        var error = Assert.Throws<ModelSourceException>(() => resolver.Resolve(dir.Path));
        Assert.Contains("has no config.json", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_config_that_is_not_json_is_an_error()
    {
        using var dir = new TempDir();
        File.WriteAllText(dir.Combine("config.json"), "{ not json");
        using var resolver = new ModelResolver(TestEnv.Settings(dir.Path));
        var error = Assert.Throws<ModelSourceException>(() => resolver.Resolve(dir.Path));
        Assert.Contains("not valid JSON", error.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("./missing-model")]
    [InlineData("/no/such/folder")]
    [InlineData("missing/config.json")]
    public void Missing_paths_are_not_sent_to_the_hub(string model)
    {
        using var cache = new TempDir();
        using var hub = new FakeHub();
        using var resolver = new ModelResolver(TestEnv.Settings(cache.Path, hub));
        var error = Assert.Throws<ModelSourceException>(() => resolver.Resolve(model));
        Assert.Contains("does not exist", error.Message, StringComparison.Ordinal);
        Assert.Empty(hub.Requests);
    }

    [Theory]
    [InlineData("org/na me")]
    [InlineData("org--x/name")]
    [InlineData("org/name.git")]
    public void Invalid_ids_are_rejected(string model)
    {
        using var cache = new TempDir();
        using var resolver = new ModelResolver(TestEnv.Settings(cache.Path));
        var error = Assert.Throws<ModelSourceException>(() => resolver.Resolve(model));
        Assert.Contains("neither an existing path nor a valid Hub id", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_cached_snapshot_is_used_without_any_request()
    {
        using var cache = new TempDir();
        using var hub = new FakeHub();
        string snapshot = WriteCachedConfig(cache.Path, "org/model", "main", Commit, """{"model_type":"llama"}""");
        using var resolver = new ModelResolver(TestEnv.Settings(cache.Path, hub));

        ResolvedModel model = resolver.Resolve("org/model");

        Assert.Equal(ModelOrigin.Cache, model.Origin);
        Assert.Equal(Commit, model.Commit);
        Assert.Equal("main", model.Revision);
        Assert.Equal(snapshot, model.Directory);
        Assert.Empty(hub.Requests);
    }

    [Fact]
    public void A_commit_hash_revision_reads_the_snapshot_directly()
    {
        using var cache = new TempDir();
        WriteCachedConfig(cache.Path, "org/model", null, Commit, """{"model_type":"llama"}""");
        using var resolver = new ModelResolver(TestEnv.Settings(cache.Path) with { Offline = true });

        ResolvedModel model = resolver.Resolve("org/model", new ResolveOptions { Revision = Commit });

        Assert.Equal(ModelOrigin.Cache, model.Origin);
        Assert.Equal(Commit, model.Commit);
    }

    [Fact]
    public void A_nested_ref_such_as_a_pull_request_is_followed()
    {
        using var cache = new TempDir();
        WriteCachedConfig(cache.Path, "org/model", "refs/pr/1", Commit, """{"model_type":"llama"}""");
        using var resolver = new ModelResolver(TestEnv.Settings(cache.Path) with { Offline = true });

        Assert.Equal(ModelOrigin.Cache, resolver.Resolve("org/model", new ResolveOptions { Revision = "refs/pr/1" }).Origin);
    }

    [Fact]
    public void Offline_falls_back_to_the_catalog_without_any_request()
    {
        using var cache = new TempDir();
        using var hub = new FakeHub();
        using var resolver = new ModelResolver(TestEnv.Settings(cache.Path, hub) with { Offline = true });

        ResolvedModel model = resolver.Resolve("mistralai/mixtral-8x7b-v0.1");

        Assert.Equal(ModelOrigin.Catalog, model.Origin);
        Assert.Equal("mistralai/Mixtral-8x7B-v0.1", model.Id);
        Assert.Contains(model.Notes, n => n.Contains("HF_HUB_OFFLINE", StringComparison.Ordinal));
        Assert.Null(resolver.ReadCheckpoint(model));
        Assert.Empty(hub.Requests);
    }

    [Fact]
    public void Offline_without_cache_or_catalog_entry_says_so()
    {
        using var cache = new TempDir();
        using var hub = new FakeHub();
        using var resolver = new ModelResolver(TestEnv.Settings(cache.Path, hub) with { Offline = true });

        var error = Assert.Throws<ModelSourceException>(() => resolver.Resolve("org/unknown"));

        Assert.Contains("HF_HUB_OFFLINE is set and org/unknown (revision main) is not in the HF cache", error.Message, StringComparison.Ordinal);
        Assert.Empty(hub.Requests);
    }

    [Fact]
    public void The_catalog_can_be_disabled()
    {
        using var cache = new TempDir();
        using var resolver = new ModelResolver(TestEnv.Settings(cache.Path) with { Offline = true });
        Assert.Throws<ModelSourceException>(() => resolver.Resolve("mistralai/Mixtral-8x7B-v0.1", new ResolveOptions { UseCatalog = false }));
    }

    [Fact]
    public async Task Checkpoint_headers_of_a_local_folder_are_read_from_disk()
    {
        using var cache = new TempDir();
        using var resolver = new ModelResolver(TestEnv.Settings(cache.Path) with { Offline = true });
        ResolvedModel model = resolver.Resolve(TestEnv.TinyDir("olmoe"));

        var checkpoint = await resolver.ReadCheckpointAsync(model);

        Assert.NotNull(checkpoint);
        Assert.Equal(new FileInfo(Path.Combine(TestEnv.TinyDir("olmoe"), "model.safetensors")).Length, checkpoint.SizeOnDisk);
        Assert.Contains(checkpoint.Tensors, t => t.Name == "model.layers.0.mlp.experts.3.down_proj.weight");
    }

    internal static string WriteCachedConfig(string cache, string repo, string? revision, string commit, string json)
    {
        string folder = Path.Combine(cache, "models--" + repo.Replace("/", "--", StringComparison.Ordinal));
        string snapshot = Path.Combine(folder, "snapshots", commit);
        Directory.CreateDirectory(snapshot);
        File.WriteAllText(Path.Combine(snapshot, "config.json"), json);
        if (revision is not null)
        {
            string refPath = Path.Combine(folder, "refs", revision);
            Directory.CreateDirectory(Path.GetDirectoryName(refPath)!);
            File.WriteAllText(refPath, commit);
        }
        return snapshot;
    }
}
