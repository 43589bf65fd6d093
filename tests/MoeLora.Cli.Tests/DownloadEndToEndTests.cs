using System.Text.Json.Nodes;
using MoeLora.Sources.Tests.Support;

namespace MoeLora.Cli.Tests;

/// <summary><c>moelora download</c> from a loopback Hub, then the other commands use the Hub id offline from the cache.</summary>
public sealed class DownloadEndToEndTests : IDisposable
{
    private static string Tiny(string type) => Path.Combine(AppContext.BaseDirectory, "Data", "hf-tiny", type, "model");

    private readonly FakeHub _hub = new();
    private readonly string _hfHome = Directory.CreateTempSubdirectory("moelora-download-").FullName;

    public void Dispose()
    {
        _hub.Dispose();
        try { Directory.Delete(_hfHome, recursive: true); } catch (IOException) { }
    }

    private MoeloraProcess.Result Run(bool offline, params string[] args) =>
        MoeloraProcess.RunWith(null, new Dictionary<string, string?>
        {
            ["HF_HOME"] = _hfHome,
            ["HF_ENDPOINT"] = _hub.Endpoint,
            ["HF_HUB_OFFLINE"] = offline ? "1" : null,
        }, args);

    [Fact]
    public void A_downloaded_model_is_reported_offline_from_the_cache_with_a_clean_checkpoint()
    {
        FakeRepo repo = _hub.AddRepo("tiny/mixtral")
            .With("config.json", File.ReadAllBytes(Path.Combine(Tiny("mixtral"), "config.json")))
            .With("model.safetensors", File.ReadAllBytes(Path.Combine(Tiny("mixtral"), "model.safetensors")));

        var download = Run(false, "download", "tiny/mixtral");

        Assert.True(download.ExitCode == 0, download.Stderr);
        string snapshot = Path.Combine(_hfHome, "hub", "models--tiny--mixtral", "snapshots", repo.Commit);
        Assert.Contains("  downloaded  model.safetensors (", download.Stdout);
        Assert.Contains("  absent      tokenizer.json (optional, not in this model)", download.Stdout);
        Assert.Contains($"2 files, ", download.Stdout);
        Assert.Contains($"Snapshot: {snapshot}", download.Stdout);
        Assert.Contains("Next: moelora report tiny/mixtral --load-model", download.Stdout);
        Assert.Equal(File.ReadAllBytes(Path.Combine(Tiny("mixtral"), "model.safetensors")), File.ReadAllBytes(Path.Combine(snapshot, "model.safetensors")));

        int requests = _hub.Requests.Count;
        var report = Run(true, "report", "tiny/mixtral", "--format", "json");

        Assert.True(report.ExitCode == 0, report.Stderr);
        var json = JsonNode.Parse(report.Stdout)!;
        Assert.True(json["checkpoint"]!["clean"]!.GetValue<bool>());
        Assert.Equal(1, json["checkpoint"]!["files"]!.GetValue<int>());
        Assert.Equal(requests, _hub.Requests.Count);

        // Again: nothing is fetched, only where main points is asked.
        var again = Run(false, "download", "tiny/mixtral");
        Assert.Contains("  in cache    model.safetensors (", again.Stdout);
        Assert.Contains("(0 B downloaded now)", again.Stdout);
    }

    [Fact]
    public void Offline_and_gated_downloads_are_one_line_errors()
    {
        _hub.AddRepo("org/gated").With("config.json", "{}").Gated = true;

        MoeloraProcess.AssertCleanError(Run(true, "download", "org/gated"), 1, "HF_HUB_OFFLINE is set");
        Assert.Empty(_hub.Requests);
        MoeloraProcess.AssertCleanError(Run(false, "download", "org/gated"), 1, "is a gated model");
    }

    [Fact]
    public void Help_renders()
    {
        var r = MoeloraProcess.Run("download", "--help");
        Assert.Equal(0, r.ExitCode);
        Assert.Equal("", r.Stderr);
        Assert.Contains("--include", r.Stdout);
    }
}
