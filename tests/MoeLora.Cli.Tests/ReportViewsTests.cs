using System.Net;
using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Rendering.Document;

namespace MoeLora.Cli.Tests;

/// <summary>
/// The report's views come from one document: each section the JSON lists (the document's own list) is a heading in
/// the terminal and Markdown views and a section in HTML, and its data is where the JSON says.
/// </summary>
[Collection("cli")]
public sealed class ReportViewsTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("moelora-views-").FullName;

    public ReportViewsTests() => Environment.SetEnvironmentVariable("HF_HUB_OFFLINE", "1");

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private static string Fixture(string model) => Path.Combine(AppContext.BaseDirectory, "Data", "hf-tiny", model, "model");

    private Dictionary<string, string> Views(params string[] args)
    {
        var views = new Dictionary<string, string>();
        foreach (var format in new[] { "text", "markdown", "html", "json" })
        {
            var file = Path.Combine(_dir, "report." + format);
            var (code, error) = InProcessCli.Run(["report", .. args, "--format", format, "-o", file]);
            Assert.True(code == 0, error);
            views[format] = File.ReadAllText(file);
        }
        return views;
    }

    public static TheoryData<string[]> Models() => new()
    {
        new[] { "meta-llama/Llama-4-Scout-17B-16E-Instruct" },
        new[] { "Qwen/Qwen3-30B-A3B", "-t", @".*layers\.(0|1)\..*(q_proj|v_proj)" },
        new[] { "Qwen/Qwen3-8B", "--target-parameters", "mlp.down_proj.weight" },
        new[] { Fixture("mixtral") }, // a local checkpoint: the checkpoint section joins the report
        new[] { Fixture("qwen3_moe"), "--load-model", "--seq-length", "4", "--dtype", "fp32" }, // measured sections
    };

    [Theory]
    [MemberData(nameof(Models))]
    public void Every_section_is_in_every_view(string[] args)
    {
        var views = Views(args);
        var json = JsonNode.Parse(views["json"])!.AsObject();
        var sections = json["sections"]!.AsArray().Select(s => (Id: s!["id"]!.GetValue<string>(), Title: s["title"]!.GetValue<string>(), Json: s["json"]!.GetValue<string>())).ToList();
        Assert.Equal(["model", "matching", "adapters", "hidden-states", "training-memory"], sections.Take(5).Select(s => s.Id));
        Assert.Contains(sections, s => s.Id == "recommendations");
        foreach (var (id, title, path) in sections)
        {
            Assert.True(JsonView.At(json, path) is not null, $"section {id}: the JSON has nothing at {path}");
            Assert.Contains($"<section id=\"{id}\"><h2>", views["html"]);
            Assert.Contains(WebUtility.HtmlEncode(title.Split(" (")[0]), views["html"]);
            Assert.Contains($"\n## {title}\n", views["markdown"]);
            if (id != "model") Assert.Contains($"── {title} ", views["text"]); // the model facts sit under the report's own rule
        }
        // The same facts in every view that shows text: a matching row's target and note, each recommendation's count.
        foreach (var row in json["lora"]!["matching"]!.AsArray())
            foreach (var view in new[] { "text", "markdown", "html" })
            {
                Assert.Contains(row!["target"]!.GetValue<string>()[..Math.Min(20, row["target"]!.GetValue<string>().Length)], views[view]);
                if (row["note"]?.GetValue<string>() is { } note && view != "text") Assert.Contains(Encode(view, note), views[view]);
            }
        foreach (var rec in json["recommendations"]!.AsArray())
            if (rec!["trainable_parameters"]?.GetValue<long>() is { } n)
                foreach (var view in new[] { "text", "markdown", "html" })
                    Assert.Contains($"trainable params: {n:N0}", views[view]);
    }

    [Fact]
    public void Load_model_shows_the_batch_line_once()
    {
        // Issue 13 saw "Batch × seq × hidden" twice in `report --load-model`: the analysis and the measured section
        // each printed it. It belongs to the hidden-states section only.
        var views = Views(Fixture("qwen3_moe"), "--load-model", "--seq-length", "4", "--dtype", "fp32");
        foreach (var view in new[] { "text", "markdown" })
            Assert.Single(System.Text.RegularExpressions.Regex.Matches(views[view], "Batch × seq × hidden"));
        Assert.Single(System.Text.RegularExpressions.Regex.Matches(views["html"], WebUtility.HtmlEncode("Batch × seq × hidden")));
        Assert.Contains("── Measured (--load-model) ", views["text"]);
    }

    private static string Encode(string view, string s) => view == "html" ? WebUtility.HtmlEncode(s) : s.Replace("*", "\\*", StringComparison.Ordinal);
}
