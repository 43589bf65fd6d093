using MoeLora.Sources.Hub;
using MoeLora.Sources.Safetensors;
using MoeLora.Sources.Tests.Support;

namespace MoeLora.Sources.Tests;

/// <summary><see cref="ModelResolver.DownloadAsync"/> against the loopback Hub and CDN.</summary>
public sealed class DownloadTests : IDisposable
{
    private const string Config = """{"model_type":"llama","hidden_size":32}""";
    private const string TokenizerConfig = """{"model_max_length":128}""";

    private readonly FakeHub _hub = new();
    private readonly TempDir _cache = new();

    public void Dispose()
    {
        _hub.Dispose();
        _cache.Dispose();
    }

    private ModelResolver Resolver(string? token = null, Func<SourceSettings, SourceSettings>? tweak = null) =>
        new((tweak ?? (s => s))(TestEnv.Settings(_cache.Path, _hub, token)));

    private string RepoFolder(string id) => _cache.Combine("models--" + id.Replace("/", "--", StringComparison.Ordinal));

    private FakeRepo TinyRepo(string id, string modelType = "mixtral") =>
        _hub.AddRepo(id)
            .With("config.json", File.ReadAllBytes(Path.Combine(TestEnv.TinyDir(modelType), "config.json")))
            .With("tokenizer_config.json", TokenizerConfig)
            .With("model.safetensors", File.ReadAllBytes(Path.Combine(TestEnv.TinyDir(modelType), "model.safetensors")));

    private static readonly byte[] FirstShard =
        SafetensorsBuilder.Build([("a.weight", SafetensorsDtype.BF16, [64, 64]), ("b.weight", SafetensorsDtype.BF16, [8])]);
    private static readonly byte[] SecondShard = SafetensorsBuilder.Build([("c.weight", SafetensorsDtype.F32, [128, 64])]);
    private const string Index = """
        {"metadata":{"total_size":41008},"weight_map":{"a.weight":"model-00001-of-00002.safetensors",
         "b.weight":"model-00001-of-00002.safetensors","c.weight":"model-00002-of-00002.safetensors"}}
        """;

    private FakeRepo ShardedRepo(string id) =>
        _hub.AddRepo(id).With("config.json", Config).With("model.safetensors.index.json", Index)
            .With("model-00001-of-00002.safetensors", FirstShard).With("model-00002-of-00002.safetensors", SecondShard);

    private static string[] Incomplete(string folder) =>
        Directory.Exists(folder) ? Directory.GetFiles(folder, "*.incomplete", SearchOption.AllDirectories) : [];

    [Fact]
    public void A_tiny_checkpoint_downloads_into_the_cache_exactly_as_huggingface_hub_lays_it_out()
    {
        FakeRepo repo = TinyRepo("org/tiny");
        using ModelResolver resolver = Resolver();

        DownloadResult result = resolver.Download("org/tiny");

        string folder = RepoFolder("org/tiny");
        string snapshot = Path.Combine(folder, "snapshots", repo.Commit);
        Assert.Equal(repo.Commit, result.Commit);
        Assert.Equal(snapshot, result.SnapshotFolder);
        Assert.Equal("model.safetensors", result.Weights);
        Assert.Equal(repo.Commit, File.ReadAllText(Path.Combine(folder, "refs", "main")));
        Assert.Equal(
            ["config.json:Downloaded", "generation_config.json:Missing", "tokenizer.json:Missing", "tokenizer_config.json:Downloaded",
             "special_tokens_map.json:Missing", "model.safetensors:Downloaded"],
            result.Files.Select(f => $"{f.Path}:{f.Status}"));
        foreach ((string name, byte[] content) in repo.Files)
        {
            // LFS files are named by their sha256, the others by their git blob sha1; snapshots link relatively.
            string etag = name.EndsWith(".safetensors", StringComparison.Ordinal) ? FakeHub.Sha256(content) : FakeHub.GitBlobSha1(content);
            Assert.Equal(content, File.ReadAllBytes(Path.Combine(folder, "blobs", etag)));
            Assert.Equal($"../../blobs/{etag}", new FileInfo(Path.Combine(snapshot, name)).LinkTarget);
            Assert.Equal(content.Length, result.Files.Single(f => f.Path == name).Size);
        }
        // Absent optional files are remembered in .no_exist, as huggingface_hub does.
        Assert.True(File.Exists(Path.Combine(folder, ".no_exist", repo.Commit, "generation_config.json")));
        Assert.Empty(Incomplete(folder));
        Assert.Equal(repo.Files.Values.Sum(c => (long)c.Length), result.BytesDownloaded);
        // The weights come from the CDN, without the token and in one GET.
        Assert.Single(_hub.Requests, r => r.Server == "cdn");

        // Offline afterwards, the model resolves from the cache and its checkpoint is read from the snapshot.
        using ModelResolver offline = Resolver(tweak: s => s with { Offline = true });
        ResolvedModel model = offline.Resolve("org/tiny");
        Assert.Equal(ModelOrigin.Cache, model.Origin);
        Assert.Equal(snapshot, model.Directory);
        Checkpoint checkpoint = offline.ReadCheckpoint(model)!;
        Assert.Equal(TestEnv.Describe(offline.ReadCheckpoint(offline.Resolve(TestEnv.TinyDir("mixtral")))!), TestEnv.Describe(checkpoint));
    }

    [Fact]
    public void A_sharded_checkpoint_downloads_its_index_and_every_shard()
    {
        FakeRepo repo = ShardedRepo("org/sharded");
        using ModelResolver resolver = Resolver();

        DownloadResult result = resolver.Download("org/sharded");

        Assert.Equal("model.safetensors.index.json", result.Weights);
        Assert.Equal(
            ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"],
            result.Present.Select(f => f.Path));
        Assert.True(File.Exists(Path.Combine(RepoFolder("org/sharded"), ".no_exist", repo.Commit, "model.safetensors")));
        Assert.Equal(FirstShard.Length + SecondShard.Length + repo.Files["config.json"].Length + repo.Files["model.safetensors.index.json"].Length,
            result.TotalBytes);

        using ModelResolver offline = Resolver(tweak: s => s with { Offline = true });
        Checkpoint checkpoint = offline.ReadCheckpoint(offline.Resolve("org/sharded"))!;
        Assert.Equal(["a.weight", "b.weight", "c.weight"], checkpoint.Tensors.Select(t => t.Name));
        Assert.Equal(FirstShard.Length + SecondShard.Length, checkpoint.SizeOnDisk);
    }

    [Fact]
    public void A_second_download_skips_complete_files_and_a_commit_revision_makes_no_request()
    {
        FakeRepo repo = ShardedRepo("org/sharded");
        using ModelResolver resolver = Resolver();
        resolver.Download("org/sharded");
        int before = _hub.Requests.Count;

        DownloadResult again = resolver.Download("org/sharded");

        Assert.All(again.Present, f => Assert.Equal(DownloadStatus.Cached, f.Status));
        Assert.Equal(0, again.BytesDownloaded);
        // One HEAD of config.json to learn where main points now; everything else comes from the snapshot.
        ServedRequest head = Assert.Single(_hub.Requests.Skip(before), r => r.Method == "HEAD");
        Assert.EndsWith("/config.json", head.Path, StringComparison.Ordinal);
        Assert.DoesNotContain(_hub.Requests.Skip(before), r => r.Method == "GET");

        before = _hub.Requests.Count;
        DownloadResult pinned = resolver.Download("org/sharded", new DownloadOptions { Revision = repo.Commit });
        Assert.Equal(again.Present.Select(f => f.Path), pinned.Present.Select(f => f.Path));
        Assert.Equal(before, _hub.Requests.Count);
    }

    [Fact]
    public void A_blob_another_commit_already_has_is_linked_without_fetching_it()
    {
        FakeRepo repo = TinyRepo("org/tiny");
        using ModelResolver resolver = Resolver();
        resolver.Download("org/tiny");
        // A new commit on main that changes only config.json: the weights blob is shared.
        repo.Branches["main"] = new string('b', 40);
        repo.Branches[new string('b', 40)] = new string('b', 40);
        repo.With("config.json", Config);
        int cdnBefore = _hub.Requests.Count(r => r.Server == "cdn");

        DownloadResult result = resolver.Download("org/tiny");

        Assert.Equal(new string('b', 40), result.Commit);
        Assert.Equal(DownloadStatus.Downloaded, result.Files.Single(f => f.Path == "config.json").Status);
        Assert.Equal(DownloadStatus.Linked, result.Files.Single(f => f.Path == "model.safetensors").Status);
        Assert.Equal(cdnBefore, _hub.Requests.Count(r => r.Server == "cdn"));
        Assert.Equal(new string('b', 40), File.ReadAllText(Path.Combine(RepoFolder("org/tiny"), "refs", "main")));
    }

    [Fact]
    public void An_interrupted_download_leaves_no_partial_blob_and_the_next_run_fetches_only_what_is_missing()
    {
        FakeRepo repo = ShardedRepo("org/sharded");
        string secondSha = FakeHub.Sha256(SecondShard);
        _hub.TruncateNext("blobs/" + secondSha, 10_000);
        using ModelResolver resolver = Resolver();

        Assert.ThrowsAny<HubException>(() => resolver.Download("org/sharded"));

        string folder = RepoFolder("org/sharded");
        Assert.False(File.Exists(Path.Combine(folder, "blobs", secondSha)));
        Assert.False(File.Exists(Path.Combine(folder, "snapshots", repo.Commit, "model-00002-of-00002.safetensors")));
        Assert.Empty(Incomplete(folder));
        Assert.True(File.Exists(Path.Combine(folder, "blobs", FakeHub.Sha256(FirstShard))));
        long firstServed = _hub.BytesServed(FakeHub.Sha256(FirstShard));

        DownloadResult resumed = resolver.Download("org/sharded");

        Assert.Equal(DownloadStatus.Downloaded, resumed.Files.Single(f => f.Path == "model-00002-of-00002.safetensors").Status);
        Assert.All(resumed.Present.Where(f => f.Path != "model-00002-of-00002.safetensors"), f => Assert.Equal(DownloadStatus.Cached, f.Status));
        Assert.Equal(firstServed, _hub.BytesServed(FakeHub.Sha256(FirstShard)));
        Assert.Equal(SecondShard, File.ReadAllBytes(Path.Combine(folder, "snapshots", repo.Commit, "model-00002-of-00002.safetensors")));
        Assert.Empty(Incomplete(folder));
    }

    [Fact]
    public void Large_files_report_progress_and_small_ones_do_not()
    {
        ShardedRepo("org/sharded");
        var progress = new RecordingProgress();
        using ModelResolver resolver = Resolver(tweak: s => s with { Progress = progress, ProgressThresholdBytes = 8_000 });
        var settled = new List<string>();

        resolver.Download("org/sharded", new DownloadOptions { OnFile = f => settled.Add(f.Path) });

        Assert.Equal(
            [("org/sharded: model-00001-of-00002.safetensors", (long?)FirstShard.Length, (long)FirstShard.Length, true),
             ("org/sharded: model-00002-of-00002.safetensors", SecondShard.Length, SecondShard.Length, true)],
            progress.Bars);
        // Every file considered is reported once, optional ones that are missing included.
        Assert.Equal([.. HubSnapshotDownloader.StandardFiles, "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"], settled);
    }

    [Fact]
    public void Include_patterns_narrow_the_list_and_literal_names_extend_it()
    {
        FakeRepo repo = ShardedRepo("org/sharded").With("README.md", "# tiny");
        using ModelResolver resolver = Resolver();

        DownloadResult json = resolver.Download("org/sharded", new DownloadOptions { Include = ["*.json"] });
        Assert.Equal(["config.json", "model.safetensors.index.json"], json.Present.Select(f => f.Path));
        Assert.DoesNotContain(_hub.Requests, r => r.Server == "cdn");

        DownloadResult extra = resolver.Download("org/sharded", new DownloadOptions { Include = ["README.md", "*-00002-*"] });
        // The index comes with any shard (a shard is useless without it); here it is already in the snapshot.
        Assert.Equal(["model.safetensors.index.json:Cached", "model-00002-of-00002.safetensors:Downloaded", "README.md:Downloaded"],
            extra.Present.Select(f => $"{f.Path}:{f.Status}"));
        Assert.True(File.Exists(Path.Combine(extra.SnapshotFolder, "README.md")));

        var missing = Assert.Throws<HubException>(() => resolver.Download("org/sharded", new DownloadOptions { Include = ["nope.txt"] }));
        Assert.Contains("nope.txt was not found in model org/sharded", missing.Message, StringComparison.Ordinal);
        Assert.Equal(repo.Commit, extra.Commit);
    }

    [Fact]
    public void Offline_is_a_clear_error_and_makes_no_request()
    {
        TinyRepo("org/tiny");
        using ModelResolver resolver = Resolver(tweak: s => s with { Offline = true });

        var error = Assert.Throws<ModelSourceException>(() => resolver.Download("org/tiny"));

        Assert.Contains("HF_HUB_OFFLINE", error.Message, StringComparison.Ordinal);
        Assert.Empty(_hub.Requests);
    }

    [Fact]
    public void A_gated_model_gives_the_gated_message_and_writes_nothing()
    {
        _hub.AddRepo("org/gated").With("config.json", Config).With("model.safetensors", FirstShard).Gated = true;
        using ModelResolver resolver = Resolver();

        var error = Assert.Throws<HubException>(() => resolver.Download("org/gated"));

        Assert.Equal(HubErrorKind.Gated, error.Kind);
        Assert.Contains("accept the licence", error.Message, StringComparison.Ordinal);
        Assert.False(Directory.Exists(Path.Combine(RepoFolder("org/gated"), "snapshots")));

        using ModelResolver granted = Resolver(FakeHub.GoodToken);
        Assert.Equal("model.safetensors", granted.Download("org/gated").Weights);
        Assert.DoesNotContain(_hub.Requests, r => r.Server == "cdn" && r.Authorization is not null);
    }

    [Fact]
    public void Missing_models_revisions_weights_and_paths_are_clear_errors()
    {
        _hub.AddRepo("org/configonly").With("config.json", Config);
        using ModelResolver resolver = Resolver();

        Assert.Equal(HubErrorKind.Unauthorized, Assert.Throws<HubException>(() => resolver.Download("org/none")).Kind);
        Assert.Equal(HubErrorKind.RevisionNotFound,
            Assert.Throws<HubException>(() => resolver.Download("org/configonly", new DownloadOptions { Revision = "v9" })).Kind);
        Assert.Contains("no safetensors weights", Assert.Throws<ModelSourceException>(() => resolver.Download("org/configonly")).Message,
            StringComparison.Ordinal);
        Assert.Contains("is a path", Assert.Throws<ModelSourceException>(() => resolver.Download(TestEnv.TinyDir("llama"))).Message,
            StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("*.json", "config.json", true)]
    [InlineData("*.json", "model.safetensors", false)]
    [InlineData("model-0000?-of-00002.safetensors", "model-00001-of-00002.safetensors", true)]
    [InlineData("model-0000[13]-*", "model-00002-of-00002.safetensors", false)]
    [InlineData("original/", "original/params.json", true)]
    [InlineData("*.safetensors", "sub/x.safetensors", true)]
    public void Globs_follow_fnmatch(string pattern, string path, bool matches) => Assert.Equal(matches, Glob.IsMatch(pattern, path));
}
