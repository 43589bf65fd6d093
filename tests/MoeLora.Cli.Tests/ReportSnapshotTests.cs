using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Tests.Support;
using MoeLora.Sources;

namespace MoeLora.Cli.Tests;

/// <summary>
/// Snapshot tests: every view of the report (text, Markdown, HTML, JSON) for a few models, compared with golden files
/// in Snapshots/ (see <see cref="Golden"/> for how to accept a change). Volatile parts are made stable: the config
/// always comes from the embedded catalog (offline, with a cache folder that exists nowhere); chart
/// images (font metrics differ between machines; the chart tests check their properties) become &lt;chart&gt;;
/// the JSON's long per-adapter lists become their length and a hash.
/// </summary>
[Collection("cli")]
public sealed partial class ReportSnapshotTests : IDisposable
{
    // A cache folder that exists on no machine: the catalog answers, and the path the report quotes is the same
    // everywhere (a temporary folder's length would move the terminal view's line breaks).
    private const string NoCache = "/nonexistent/moelora-snapshots/hf-cache";

    private readonly string _dir = Path.Combine(Path.GetTempPath(), "moelora-snap-" + Guid.NewGuid().ToString("N"));
    private readonly Func<SourceSettings> _savedSettings = ModelLoader.Settings;

    public ReportSnapshotTests()
    {
        Directory.CreateDirectory(_dir);
        ModelLoader.Settings = () => new SourceSettings { HubCache = NoCache, Offline = true };
    }

    public void Dispose()
    {
        ModelLoader.Settings = _savedSettings;
        Directory.Delete(_dir, recursive: true);
    }

    public static TheoryData<string, string, string[]> Cases()
    {
        var cases = new (string Name, string[] Args)[]
        {
            ("scout", ["meta-llama/Llama-4-Scout-17B-16E-Instruct"]),
            ("mixtral-w1-w2-w3", ["mistralai/Mixtral-8x7B-v0.1", "-t", "w1,w2,w3"]),
            ("qwen3-30b-a3b-layer-regex", ["Qwen/Qwen3-30B-A3B", "-t", @".*layers\.(0|1)\..*(q_proj|v_proj)"]),
            ("deepseek-v3", ["deepseek-ai/DeepSeek-V3", "--gpus", "8", "--sharding", "zero3"]),
            ("llama-3.1-8b-dense", ["meta-llama/Meta-Llama-3.1-8B", "--target-modules", "all-linear", "-r", "8"]),
        };
        var data = new TheoryData<string, string, string[]>();
        foreach (var (name, args) in cases)
            foreach (var format in new[] { "text", "markdown", "html", "json" })
                data.Add(name, format, args);
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Report_view_matches_its_golden_file(string name, string format, string[] args)
    {
        var extension = format switch { "markdown" => "md", "text" => "txt", _ => format };
        var file = Path.Combine(_dir, $"{name}.{extension}");
        var (code, error) = InProcessCli.Run(["report", .. args, "--format", format, "-o", file]);
        Assert.True(code == 0, error);
        var output = Stable(File.ReadAllText(file));
        if (format == "json") output = StableJson(output);
        Golden.Verify($"report-{name}.{extension}", output);
    }

    [Fact]
    public void A_changed_view_fails_and_says_how_to_accept_it()
    {
        if (Golden.Accepting) return; // accepting rewrites golden files on purpose; this check would rewrite one wrongly
        const string name = "report-llama-3.1-8b-dense.txt";
        var golden = File.ReadAllText(Path.Combine(Golden.Folder, name));
        var received = Path.Combine(Golden.Folder, "report-llama-3.1-8b-dense.received.txt");
        try
        {
            var e = Assert.ThrowsAny<Xunit.Sdk.XunitException>(() => Golden.Verify(name, golden.Replace("Is MoE", "Is dense", StringComparison.Ordinal)));
            Assert.Contains("at line ", e.Message);
            Assert.Contains("MOELORA_ACCEPT=1", e.Message);
            Assert.True(File.Exists(received));
            Assert.Equal(golden, File.ReadAllText(Path.Combine(Golden.Folder, name))); // the golden file is untouched
        }
        finally
        {
            File.Delete(received);
        }
    }

    private static string Stable(string s) => ChartImage().Replace(s, "data:image/svg+xml;base64,<chart>");

    /// <summary>The per-adapter lists (thousands of entries for DeepSeek-V3) as "N entries, sha256 …": still fails on any change.</summary>
    private static string StableJson(string s)
    {
        var json = JsonNode.Parse(s)!.AsObject();
        var lora = json["lora"]!.AsObject();
        foreach (var key in new[] { "targets", "adapter_tensors" })
        {
            var text = lora[key]!.ToJsonString();
            var count = lora[key] is JsonArray a ? a.Count : lora[key]!.AsObject().Count;
            lora[key] = $"{count} entries, sha256 {Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(text)))[..16]}";
        }
        return json.ToJsonString(new JsonSerializerOptions { WriteIndented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping }) + "\n";
    }

    [GeneratedRegex("data:image/svg\\+xml;base64,[A-Za-z0-9+/=]+")]
    private static partial Regex ChartImage();
}
