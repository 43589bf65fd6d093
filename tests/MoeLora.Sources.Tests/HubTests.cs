using System.Diagnostics;
using MoeLora.Sources.Safetensors;
using MoeLora.Sources.Tests.Support;

namespace MoeLora.Sources.Tests;

/// <summary>The Hub client against a real HTTP server on loopback (plus a second one playing the file CDN).</summary>
public sealed class HubTests : IDisposable
{
    private const string Config = """{"model_type":"llama","hidden_size":32}""";

    private readonly FakeHub _hub = new();
    private readonly TempDir _cache = new();

    public void Dispose()
    {
        _hub.Dispose();
        _cache.Dispose();
    }

    private ModelResolver Resolver(string? token = null, Func<SourceSettings, SourceSettings>? tweak = null) =>
        new((tweak ?? (s => s))(TestEnv.Settings(_cache.Path, _hub, token)));

    private FakeRepo TinyRepo(string id, string modelType) =>
        _hub.AddRepo(id)
            .With("config.json", File.ReadAllBytes(Path.Combine(TestEnv.TinyDir(modelType), "config.json")))
            .With("model.safetensors", File.ReadAllBytes(Path.Combine(TestEnv.TinyDir(modelType), "model.safetensors")));

    [Fact]
    public void A_downloaded_config_lands_in_the_cache_exactly_as_huggingface_hub_lays_it_out()
    {
        FakeRepo repo = _hub.AddRepo("org/model").With("config.json", Config);
        using ModelResolver resolver = Resolver();

        ResolvedModel model = resolver.Resolve("org/model");

        Assert.Equal(ModelOrigin.Hub, model.Origin);
        Assert.Equal(Config, model.ConfigJson);
        Assert.Equal(repo.Commit, model.Commit);
        string folder = _cache.Combine("models--org--model");
        string etag = FakeHub.GitBlobSha1(repo.Files["config.json"]);
        Assert.Equal(Config, File.ReadAllText(Path.Combine(folder, "blobs", etag)));
        Assert.Equal(repo.Commit, File.ReadAllText(Path.Combine(folder, "refs", "main")));
        var link = new FileInfo(Path.Combine(folder, "snapshots", repo.Commit, "config.json"));
        Assert.Equal($"../../blobs/{etag}", link.LinkTarget);
        Assert.Equal(Path.Combine(folder, "snapshots", repo.Commit), model.Directory);
        Assert.Empty(Directory.GetFiles(Path.Combine(folder, "blobs"), "*.incomplete"));

        // The second time the cache answers and no request is made.
        int requests = _hub.Requests.Count;
        using ModelResolver again = Resolver();
        Assert.Equal(ModelOrigin.Cache, again.Resolve("org/model").Origin);
        Assert.Equal(requests, _hub.Requests.Count);
    }

    [Fact]
    public void Without_symlinks_the_snapshot_holds_a_copy()
    {
        FakeRepo repo = _hub.AddRepo("org/model").With("config.json", Config);
        using ModelResolver resolver = Resolver(tweak: s => s with { DisableSymlinks = true });

        resolver.Resolve("org/model");

        var file = new FileInfo(_cache.Combine("models--org--model", "snapshots", repo.Commit, "config.json"));
        Assert.Null(file.LinkTarget);
        Assert.Equal(Config, File.ReadAllText(file.FullName));
    }

    [Fact]
    public void A_pull_request_revision_is_encoded_as_one_segment_and_its_ref_nests()
    {
        FakeRepo repo = _hub.AddRepo("org/model").With("config.json", Config);
        repo.Branches["refs/pr/1"] = repo.Commit;
        using ModelResolver resolver = Resolver();

        ResolvedModel model = resolver.Resolve("org/model", new ResolveOptions { Revision = "refs/pr/1" });

        Assert.Equal(ModelOrigin.Hub, model.Origin);
        Assert.Contains(_hub.Requests, r => r.Path == "/org/model/resolve/refs%2Fpr%2F1/config.json");
        Assert.Equal(repo.Commit, File.ReadAllText(_cache.Combine("models--org--model", "refs", "refs", "pr", "1")));
    }

    [Fact]
    public void A_gated_model_without_a_token_says_to_accept_the_licence_and_set_hf_token()
    {
        _hub.AddRepo("org/gated").With("config.json", Config).Gated = true;
        using ModelResolver resolver = Resolver();

        var error = Assert.Throws<HubException>(() => resolver.Resolve("org/gated"));

        Assert.Equal(HubErrorKind.Gated, error.Kind);
        Assert.Equal(401, error.StatusCode);
        Assert.Contains($"accept the licence at {_hub.Endpoint}/org/gated", error.Message, StringComparison.Ordinal);
        Assert.Contains("HF_TOKEN", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_gated_model_with_an_ungranted_token_says_access_was_not_granted()
    {
        _hub.AddRepo("org/gated").With("config.json", Config).Gated = true;
        using ModelResolver resolver = Resolver(FakeHub.UngrantedToken);

        var error = Assert.Throws<HubException>(() => resolver.Resolve("org/gated"));

        Assert.Equal(HubErrorKind.Gated, error.Kind);
        Assert.Equal(403, error.StatusCode);
        Assert.Contains("not been granted access", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_gated_model_with_a_granted_token_resolves_and_the_token_reaches_the_hub()
    {
        _hub.AddRepo("org/gated").With("config.json", Config).Gated = true;
        using ModelResolver resolver = Resolver(FakeHub.GoodToken);

        Assert.Equal(ModelOrigin.Hub, resolver.Resolve("org/gated").Origin);
        Assert.All(_hub.Requests, r => Assert.Equal($"Bearer {FakeHub.GoodToken}", r.Authorization));
    }

    [Fact]
    public void A_gated_catalog_model_falls_back_to_the_embedded_copy_and_says_why()
    {
        _hub.AddRepo("meta-llama/Llama-4-Scout-17B-16E-Instruct").With("config.json", Config).Gated = true;
        using ModelResolver resolver = Resolver();

        ResolvedModel model = resolver.Resolve("meta-llama/Llama-4-Scout-17B-16E-Instruct");

        Assert.Equal(ModelOrigin.Catalog, model.Origin);
        Assert.Contains(model.Notes, n => n.Contains("gated", StringComparison.Ordinal));
    }

    [Fact]
    public void A_renamed_gated_repo_redirects_on_the_same_host_and_keeps_the_token()
    {
        _hub.AddRepo("org/new-name").With("config.json", Config).Gated = true;
        _hub.Rename("org/old-name", "org/new-name");
        using ModelResolver resolver = Resolver(FakeHub.GoodToken);

        Assert.Equal(Config, resolver.Resolve("org/old-name").ConfigJson);
        Assert.Equal([307, 200], _hub.Requests.Select(r => r.Status));
        Assert.All(_hub.Requests, r => Assert.Equal($"Bearer {FakeHub.GoodToken}", r.Authorization));
    }

    [Fact]
    public void Large_downloads_report_progress_and_small_ones_do_not()
    {
        string big = "{\"pad\":\"" + new string('x', 300_000) + "\"}";
        _hub.AddRepo("org/big").With("config.json", big);
        _hub.AddRepo("org/small").With("config.json", Config);
        var progress = new RecordingProgress();
        using ModelResolver resolver = Resolver(tweak: s => s with { Progress = progress, ProgressThresholdBytes = 100_000 });

        resolver.Resolve("org/small");
        resolver.Resolve("org/big");

        (string label, long? total, long advanced, bool disposed) = Assert.Single(progress.Bars);
        Assert.Equal(("org/big: config.json", (long?)big.Length, (long)big.Length, true), (label, total, advanced, disposed));
    }

    [Fact]
    public void An_invalid_token_is_reported_as_such()
    {
        _hub.AddRepo("org/model").With("config.json", Config);
        using ModelResolver resolver = Resolver(FakeHub.InvalidToken);

        var error = Assert.Throws<HubException>(() => resolver.Resolve("org/model"));

        Assert.Equal(HubErrorKind.Unauthorized, error.Kind);
        Assert.Contains("invalid credentials", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_missing_model_names_the_repo_and_revision()
    {
        using ModelResolver anonymous = Resolver();
        var hidden = Assert.Throws<HubException>(() => anonymous.Resolve("org/missing"));
        Assert.Equal(HubErrorKind.Unauthorized, hidden.Kind);
        Assert.Contains("org/missing (revision main) was not found", hidden.Message, StringComparison.Ordinal);
        Assert.Contains("private or gated", hidden.Message, StringComparison.Ordinal);

        using ModelResolver authenticated = Resolver(FakeHub.GoodToken);
        var missing = Assert.Throws<HubException>(() => authenticated.Resolve("org/missing", new ResolveOptions { Revision = "v2" }));
        Assert.Equal(HubErrorKind.RepoNotFound, missing.Kind);
        Assert.Equal(404, missing.StatusCode);
        Assert.Contains("org/missing", missing.Message, StringComparison.Ordinal);
        Assert.Contains("revision v2", missing.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_missing_revision_is_named()
    {
        _hub.AddRepo("org/model").With("config.json", Config);
        using ModelResolver resolver = Resolver();

        var error = Assert.Throws<HubException>(() => resolver.Resolve("org/model", new ResolveOptions { Revision = "nope" }));

        Assert.Equal(HubErrorKind.RevisionNotFound, error.Kind);
        Assert.Contains("revision nope was not found in model org/model", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_repo_without_config_json_is_reported_and_remembered_in_no_exist()
    {
        FakeRepo repo = _hub.AddRepo("org/weights-only").With("model.safetensors", SafetensorsBuilder.Build([]));
        using ModelResolver resolver = Resolver();

        var error = Assert.Throws<HubException>(() => resolver.Resolve("org/weights-only"));

        Assert.Equal(HubErrorKind.EntryNotFound, error.Kind);
        Assert.Contains("no config.json at revision main", error.Message, StringComparison.Ordinal);
        Assert.True(File.Exists(_cache.Combine("models--org--weights-only", ".no_exist", repo.Commit, "config.json")));
    }

    [Fact]
    public void Server_errors_are_retried_and_then_succeed()
    {
        _hub.AddRepo("org/model").With("config.json", Config);
        _hub.FailNext("config.json", 503, times: 2, retryAfter: "0");
        using ModelResolver resolver = Resolver();

        Assert.Equal(ModelOrigin.Hub, resolver.Resolve("org/model").Origin);
        Assert.Equal([503, 503, 200], _hub.Requests.Select(r => r.Status));
    }

    [Fact]
    public void Retry_after_is_honoured()
    {
        _hub.AddRepo("org/model").With("config.json", Config);
        _hub.FailNext("config.json", 429, times: 1, retryAfter: "1");
        using ModelResolver resolver = Resolver();
        var clock = Stopwatch.StartNew();

        resolver.Resolve("org/model");

        Assert.True(clock.Elapsed >= TimeSpan.FromSeconds(0.9), $"retried after {clock.Elapsed}");
        Assert.Equal([429, 200], _hub.Requests.Select(r => r.Status));
    }

    [Fact]
    public void Persistent_rate_limiting_and_server_errors_give_up_after_the_retries()
    {
        _hub.AddRepo("org/model").With("config.json", Config);
        _hub.FailNext("org/model/", 429, times: 100, retryAfter: "0");
        using ModelResolver resolver = Resolver();
        var limited = Assert.Throws<HubException>(() => resolver.Resolve("org/model"));
        Assert.Equal(HubErrorKind.RateLimited, limited.Kind);
        Assert.Contains("HTTP 429, 4 attempts", limited.Message, StringComparison.Ordinal);

        _hub.AddRepo("org/broken").With("config.json", Config);
        _hub.FailNext("org/broken", 500, times: 100);
        var failed = Assert.Throws<HubException>(() => resolver.Resolve("org/broken"));
        Assert.Equal(HubErrorKind.Server, failed.Kind);
        Assert.Contains("HTTP 500", failed.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_server_that_does_not_answer_times_out()
    {
        _hub.AddRepo("org/slow").With("config.json", Config);
        _hub.DelayNext("org/slow", TimeSpan.FromSeconds(5));
        using ModelResolver resolver = Resolver(tweak: s => s with { RequestTimeout = TimeSpan.FromMilliseconds(300) });

        // No wall-clock bound (a loaded CI machine would make it flaky): without the 0.3 s timeout the 5 s answer
        // would arrive and Resolve would succeed, so the error itself proves the timeout applied.
        var error = Assert.Throws<HubException>(() => resolver.Resolve("org/slow"));

        Assert.Equal(HubErrorKind.Timeout, error.Kind);
        Assert.Contains("did not answer within 0.3 s", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_slow_server_within_the_timeout_is_fine()
    {
        _hub.AddRepo("org/slowish").With("config.json", Config);
        _hub.DelayNext("org/slowish", TimeSpan.FromMilliseconds(200));
        using ModelResolver resolver = Resolver();

        Assert.Equal(ModelOrigin.Hub, resolver.Resolve("org/slowish").Origin);
    }

    [Fact]
    public void An_unreachable_hub_falls_back_to_the_catalog_or_says_it_cannot_connect()
    {
        string closed;
        using (var gone = new FakeHub()) closed = gone.Endpoint;
        using var resolver = new ModelResolver(TestEnv.Settings(_cache.Path) with { Endpoint = closed });

        ResolvedModel model = resolver.Resolve("Qwen/Qwen3-30B-A3B");
        Assert.Equal(ModelOrigin.Catalog, model.Origin);
        Assert.Contains(model.Notes, n => n.Contains("cannot reach", StringComparison.Ordinal));

        var error = Assert.Throws<HubException>(() => resolver.Resolve("org/unknown"));
        Assert.Equal(HubErrorKind.Unreachable, error.Kind);
        Assert.StartsWith($"cannot reach {closed}", error.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_download_cut_short_never_lands_in_the_cache()
    {
        string big = "{\"model_type\":\"llama\",\"pad\":\"" + new string('x', 100_000) + "\"}";
        _hub.AddRepo("org/model").With("config.json", big);
        _hub.TruncateNext("config.json", 40_000);
        using ModelResolver resolver = Resolver();

        Assert.Throws<HubException>(() => resolver.Resolve("org/model"));

        string folder = _cache.Combine("models--org--model");
        Assert.False(Directory.Exists(Path.Combine(folder, "snapshots")));
        Assert.False(Directory.Exists(Path.Combine(folder, "refs")));
        Assert.Empty(Directory.Exists(Path.Combine(folder, "blobs")) ? Directory.GetFiles(Path.Combine(folder, "blobs")) : []);

        // Once the server behaves, the same call succeeds.
        Assert.Equal(big, resolver.Resolve("org/model").ConfigJson);
    }

    [Fact]
    public void Checkpoint_headers_come_from_the_cdn_with_range_requests_and_without_the_token()
    {
        FakeRepo repo = TinyRepo("org/tiny", "mixtral");
        byte[] weights = repo.Files["model.safetensors"];
        using ModelResolver resolver = Resolver(FakeHub.GoodToken, s => s with { HeaderProbeBytes = 16 });
        ResolvedModel model = resolver.Resolve("org/tiny");

        Checkpoint checkpoint = resolver.ReadCheckpoint(model)!;

        long headerLength = checkpoint.Files.Single().Header.HeaderLength;
        Assert.Equal(weights.Length, checkpoint.SizeOnDisk);
        // Exactly the length prefix and the header, nothing of the weights.
        Assert.Equal(8 + headerLength, _hub.BytesServed("/blobs/"));
        ServedRequest[] cdn = _hub.Requests.Where(r => r.Server == "cdn").ToArray();
        Assert.Equal(["bytes=0-15", $"bytes=16-{8 + headerLength - 1}"], cdn.Select(r => r.Range));
        Assert.All(cdn, r => Assert.Null(r.Authorization));
        Assert.All(_hub.Requests.Where(r => r.Server == "hub"), r => Assert.NotNull(r.Authorization));
        // Shards are pinned to the commit the config came from.
        Assert.Contains(_hub.Requests, r => r.Path == $"/org/tiny/resolve/{repo.Commit}/model.safetensors");
    }

    [Fact]
    public void A_cdn_that_ignores_range_still_yields_the_header()
    {
        TinyRepo("org/tiny", "qwen2_moe");
        _hub.CdnIgnoresRange = true;
        using ModelResolver resolver = Resolver();
        ResolvedModel model = resolver.Resolve("org/tiny");

        Checkpoint checkpoint = resolver.ReadCheckpoint(model)!;

        Assert.Equal(
            TestEnv.Describe(ReadFromDisk("qwen2_moe")),
            TestEnv.Describe(checkpoint));
    }

    [Fact]
    public void A_sharded_checkpoint_is_read_through_its_index()
    {
        byte[] first = SafetensorsBuilder.Build([("a.weight", SafetensorsDtype.BF16, [4, 8]), ("b.weight", SafetensorsDtype.BF16, [8])]);
        byte[] second = SafetensorsBuilder.Build([("c.weight", SafetensorsDtype.F8_E4M3, [16, 4])]);
        const string index = """
            {"metadata":{"total_size":144},"weight_map":{"a.weight":"model-00001-of-00002.safetensors",
             "b.weight":"model-00001-of-00002.safetensors","c.weight":"model-00002-of-00002.safetensors"}}
            """;
        FakeRepo repo = _hub.AddRepo("org/sharded").With("config.json", Config).With("model.safetensors.index.json", index)
            .With("model-00001-of-00002.safetensors", first).With("model-00002-of-00002.safetensors", second);
        using ModelResolver resolver = Resolver();
        ResolvedModel model = resolver.Resolve("org/sharded");

        Checkpoint checkpoint = resolver.ReadCheckpoint(model)!;

        Assert.Equal(["a.weight", "b.weight", "c.weight"], checkpoint.Tensors.Select(t => t.Name));
        Assert.Equal(144, checkpoint.DataSize);
        Assert.Equal(first.Length + second.Length, checkpoint.SizeOnDisk);
        Assert.Equal([SafetensorsDtype.BF16, SafetensorsDtype.F8_E4M3], checkpoint.DtypeTotals.Select(d => d.Dtype));
        // The missing single file is remembered, the index is cached like any downloaded file.
        Assert.True(File.Exists(_cache.Combine("models--org--sharded", ".no_exist", repo.Commit, "model.safetensors")));
        Assert.True(File.Exists(_cache.Combine("models--org--sharded", "snapshots", repo.Commit, "model.safetensors.index.json")));
    }

    [Fact]
    public void Offline_checkpoint_reading_makes_no_request()
    {
        TinyRepo("org/tiny", "llama");
        using (ModelResolver online = Resolver()) online.Resolve("org/tiny");
        int before = _hub.Requests.Count;
        using ModelResolver offline = Resolver(tweak: s => s with { Offline = true });

        ResolvedModel model = offline.Resolve("org/tiny");

        Assert.Equal(ModelOrigin.Cache, model.Origin);
        Assert.Null(offline.ReadCheckpoint(model));
        Assert.Equal(before, _hub.Requests.Count);
    }

    [Theory]
    [MemberData(nameof(TinyModels))]
    public void Tiny_checkpoints_read_the_same_from_disk_and_from_the_hub(string modelType)
    {
        TinyRepo($"tiny/{modelType}", modelType);
        using ModelResolver resolver = Resolver(tweak: s => s with { HeaderProbeBytes = 4096 });

        ResolvedModel fromHub = resolver.Resolve($"tiny/{modelType}");
        ResolvedModel fromDisk = resolver.Resolve(TestEnv.TinyDir(modelType));

        Assert.Equal(fromDisk.ConfigJson, fromHub.ConfigJson);
        Assert.Equal(TestEnv.Describe(resolver.ReadCheckpoint(fromDisk)!), TestEnv.Describe(resolver.ReadCheckpoint(fromHub)!));
        Assert.True(_hub.BytesServed("/blobs/") < new FileInfo(Path.Combine(TestEnv.TinyDir(modelType), "model.safetensors")).Length / 4);
    }

    public static TheoryData<string> TinyModels() => [.. TestEnv.TinyModelTypes];

    private static Checkpoint ReadFromDisk(string modelType) =>
        CheckpointReader.TryReadAsync(new DirectoryCheckpointStore(TestEnv.TinyDir(modelType))).GetAwaiter().GetResult()!;
}
