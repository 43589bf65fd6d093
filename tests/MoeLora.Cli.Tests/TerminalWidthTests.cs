using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using MoeLora.Cli.Rendering;
using Spectre.Console;
using Spectre.Console.Rendering;

namespace MoeLora.Cli.Tests;

/// <summary>
/// Terminal output at a given width: no identifier (module, parameter, target, model id) is split across lines, no
/// line is wider than the terminal, and piped output carries no trailing padding.
/// </summary>
[Collection("cli")] // in-process runs share the static Consoles
public sealed partial class TerminalWidthTests : IDisposable
{
    readonly string _tmp = Directory.CreateTempSubdirectory("moelora-width-").FullName;

    public TerminalWidthTests() => Environment.SetEnvironmentVariable("HF_HUB_OFFLINE", "1");

    public void Dispose() => Directory.Delete(_tmp, recursive: true);

    static string Fixture(string model) => Path.Combine(AppContext.BaseDirectory, "Data", "hf-tiny", model);

    /// <summary>Dotted, slashed or snake_case names: what a table must never break (numbers alone are not names).</summary>
    [GeneratedRegex(@"[A-Za-z0-9_]+(?:[._/-][A-Za-z0-9_*]+)+|[A-Za-z]+_[A-Za-z0-9_]+")]
    private static partial Regex Identifier();

    static Dictionary<string, int> Identifiers(string text) =>
        Identifier().Matches(text).GroupBy(m => m.Value).ToDictionary(g => g.Key, g => g.Count());

    string[] Args(string[] command) => command.Select(a => a.Replace("{tmp}", Path.Combine(_tmp, "p"), StringComparison.Ordinal)
        .Replace("{fixture}", Path.Combine(Fixture("mixtral"), "attn_plus_experts"), StringComparison.Ordinal)).ToArray();

    static string Render(int width, string[] args)
    {
        var (code, stdout, err) = InProcessCli.RunCapturing(width, args);
        Assert.True(code == 0, $"{string.Join(' ', args)} at {width} columns: exit {code}, {err}");
        return stdout;
    }

    /// <summary>
    /// Generic: every name that the output shows on a very wide terminal is shown whole, as often, at 80, 100 and 120
    /// columns (a name split across lines stops matching), and no line is wider than the terminal (a folder path
    /// longer than the line, which only the adapter header shows, is the one thing allowed to wrap).
    /// </summary>
    [Theory]
    [InlineData("models")]
    [InlineData("report", "mistralai/Mixtral-8x7B-v0.1")]
    [InlineData("report", "Qwen/Qwen3-30B-A3B")]
    [InlineData("report", "deepseek-ai/DeepSeek-V3")]
    [InlineData("report", "meta-llama/Llama-4-Scout-17B-16E-Instruct")]
    [InlineData("report", "mistralai/Mixtral-8x7B-v0.1", "-t", "w1,w2,w3")]
    [InlineData("modules", "Qwen/Qwen3-30B-A3B")]
    [InlineData("diff", "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen3-30B-A3B")]
    [InlineData("plan", "Qwen/Qwen3-30B-A3B", "--gpus", "8", "--sharding", "zero3", "-o", "{tmp}", "--overwrite")]
    [InlineData("adapter", "inspect", "{fixture}")]
    public void No_name_is_split_at_80_100_or_120_columns(params string[] command)
    {
        var args = Args(command);
        var wide = Identifiers(Render(1000, args));
        Assert.NotEmpty(wide);
        foreach (var width in new[] { 80, 100, 120 })
        {
            var text = Render(width, args);
            var narrow = Identifiers(text);
            // A name longer than the line itself (this machine's temporary paths) cannot stay whole.
            var split = wide.Where(kv => kv.Key.Length <= width - 16 && narrow.GetValueOrDefault(kv.Key) < kv.Value).Select(kv => kv.Key).ToList();
            Assert.True(split.Count == 0, $"{string.Join(' ', command)} at {width} columns splits: {string.Join(", ", split.Take(10))}\n{text}");
            foreach (var line in text.Split('\n'))
            {
                Assert.True(line.Length <= width, $"{line.Length} columns at {width}: {line}");
                Assert.DoesNotContain("…", line);
            }
        }
    }

    /// <summary>What the issue showed: the matching table at exactly 100 columns kept gate_proj whole, per model.</summary>
    [Theory]
    [InlineData("mistralai/Mixtral-8x7B-v0.1")]
    [InlineData("Qwen/Qwen3-30B-A3B")]
    [InlineData("deepseek-ai/DeepSeek-V3")]
    [InlineData("meta-llama/Llama-4-Scout-17B-16E-Instruct")]
    public void Every_target_and_shape_of_the_matching_table_is_whole_at_100_columns(string model)
    {
        var json = JsonNode.Parse(Render(100, ["report", model, "--format", "json"]))!;
        var text = Render(100, ["report", model]);
        var lines = text.Split('\n');
        var rows = json["lora"]!["matching"]!.AsArray();
        Assert.NotEmpty(rows);
        foreach (var row in rows)
        {
            var target = row!["target"]!.GetValue<string>();
            Assert.True(lines.Any(l => Regex.IsMatch(l, $@"│ {Regex.Escape(target)} +│")), $"{target} is not whole in a row of the matching table:\n{text}");
        }
    }

    /// <summary>Every module name of the model appears whole in <c>modules</c> at 100 columns.</summary>
    [Fact]
    public void Every_module_name_is_whole_in_modules_at_100_columns()
    {
        var json = JsonNode.Parse(Render(100, ["modules", "Qwen/Qwen3-30B-A3B", "--format", "json"]))!;
        var words = Render(100, ["modules", "Qwen/Qwen3-30B-A3B"]).Split([' ', '\n'], StringSplitOptions.RemoveEmptyEntries).ToHashSet();
        var names = json["modules"]!.AsArray().Select(m => m![0]!.GetValue<string>()).Where(n => n.Length > 0).ToList();
        Assert.True(names.Count > 500, $"{names.Count} modules");
        Assert.All(names, n => Assert.Contains(n, words));
    }

    static string RenderTable(IRenderable table, int width)
    {
        var (console, buffer) = Infrastructure.Consoles.Plain(width);
        console.Write(table);
        return buffer.ToString();
    }

    [Fact]
    public void A_table_drops_empty_sparse_columns_and_never_splits_a_word()
    {
        var table = new FitTable(
            [new("target"), new("count", Right: true), new("router", Right: true, Sparse: true), new("vision", Right: true, Sparse: true), new("note", Sparse: true)],
            [
                ["model.layers.0.mlp.experts.gate_up_proj", "12", "·", "3", "a note that is long enough to need wrapping in a narrow terminal"],
                ["lm_head", "1", "·", "·", ""],
            ]);
        // From the width where the longest word (the module name) fits on a line at all.
        for (var width = 45; width <= 160; width += 7)
        {
            var text = RenderTable(table, width);
            Assert.DoesNotContain("router", text);
            Assert.Contains("vision", text);
            Assert.Contains("model.layers.0.mlp.experts.gate_up_proj", text);
            foreach (var word in "a note that is long enough to need wrapping in a narrow terminal".Split(' '))
                Assert.Matches($@"(^|[ │]){word}($|[ │])", text.Replace("\n", " │ "));
            Assert.All(text.Split('\n'), line => Assert.True(line.Length <= width, $"{line.Length} > {width}: {line}"));
        }
        // Too narrow for the longest words side by side: each row is stacked, one "header: value" per line.
        var stacked = RenderTable(table, 50);
        Assert.Contains("model.layers.0.mlp.experts.gate_up_proj\n  count: 12\n  vision: 3\n", stacked);
        Assert.DoesNotContain("│", stacked);
        // Wide enough: an ordinary table with every row on one line.
        Assert.Contains("│ lm_head ", RenderTable(table, 160));
    }

    [Fact]
    public void Code_wraps_after_commas_outside_strings()
    {
        const string code = "LoraConfig(r=16, target_modules=[\"down_proj\",\"gate_proj\",\"k_proj\"], target_parameters=[r\"a, b\",\"mlp.experts.gate_up_proj\"])";
        Assert.Equal("   " + code, CodeWrap.Wrap(code, "   ", 200));
        // From the width where the longest piece without a break (`target_parameters=[r"a, b",` and its indent) fits.
        for (var width = 35; width <= 120; width += 5)
        {
            var wrapped = CodeWrap.Wrap(code, "   ", width);
            var lines = wrapped.Split('\n');
            Assert.StartsWith("   LoraConfig(", lines[0]);
            Assert.All(lines.Skip(1), l => Assert.StartsWith("       ", l));
            // Joined back it is the same code (breaks only where a comma or space was), and no string was cut.
            Assert.Equal(code.Replace(" ", ""), string.Concat(lines.Select(l => l.Trim())).Replace(" ", ""));
            Assert.All(lines, l => Assert.True(l.Count(c => c == '"') % 2 == 0, $"a string is cut at {width}: {l}"));
            Assert.All(lines, l => Assert.True(l.Length <= width, $"{l.Length} > {width}: {l}"));
        }
    }

    /// <summary>
    /// The real executable with its output piped (as in a script or `| less`): no line ends in a space, and with
    /// COLUMNS=100 no line is wider than 100. Every command that prints a table or a grid.
    /// </summary>
    [Theory]
    [InlineData("report", "mistralai/Mixtral-8x7B-v0.1")]
    [InlineData("report", "deepseek-ai/DeepSeek-V3", "--gpus", "8", "--sharding", "zero3")]
    [InlineData("modules", "mistralai/Mixtral-8x7B-v0.1")]
    [InlineData("models")]
    [InlineData("diff", "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen3-30B-A3B")]
    [InlineData("plan", "Qwen/Qwen3-30B-A3B", "--gpus", "8", "--sharding", "zero3", "-o", "{tmp}", "--overwrite")]
    [InlineData("adapter", "inspect", "{fixture}")]
    [InlineData("routers", "{olmoe}", "--harmful", "{h}", "--benign", "{b}", "--heatmap", "{png}")]
    public void Piped_output_has_no_trailing_spaces(params string[] command)
    {
        var h = Path.Combine(_tmp, "h.jsonl");
        var b = Path.Combine(_tmp, "b.jsonl");
        File.WriteAllLines(h, ["{\"input_ids\": [1, 5, 9, 20, 3]}"]);
        File.WriteAllLines(b, ["{\"input_ids\": [100, 101, 102, 3]}"]);
        var args = Args(command).Select(a => a switch
        {
            "{olmoe}" => Path.Combine(Fixture("olmoe"), "model"),
            "{h}" => h,
            "{b}" => b,
            "{png}" => Path.Combine(_tmp, "routers.png"),
            _ => a,
        }).ToArray();
        foreach (var columns in new string?[] { null, "100" })
        {
            var r = MoeloraProcess.RunWith(null, new Dictionary<string, string?> { ["COLUMNS"] = columns }, args);
            Assert.True(r.ExitCode == 0, r.Stderr);
            var lines = r.Stdout.Split('\n');
            Assert.True(lines.Length > 3, r.Stdout);
            var padded = lines.Where(l => l.EndsWith(' ')).ToList();
            Assert.True(padded.Count == 0, $"{padded.Count} lines end in a space, e.g. '{padded.FirstOrDefault()}'");
            if (columns is not null) Assert.All(lines, l => Assert.True(l.Length <= 100, $"{l.Length} columns: {l}"));
        }
    }
}
