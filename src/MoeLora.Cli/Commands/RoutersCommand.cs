using System.ComponentModel;
using System.Text.Json.Nodes;
using MoeLora.Torch.Nn;
using Spectre.Console;
using Spectre.Console.Cli;
using static TorchSharp.torch;
using MoeLora.Core;

namespace MoeLora.Cli.Commands;

/// <summary>
/// <c>moelora routers MODEL --harmful A.jsonl --benign B.jsonl</c>: per MoE layer, how often each routed expert is
/// dispatched for each set (each prompt runs alone, so no padding enters the counts), the Jensen-Shannon divergence
/// (base 2, 0..1) between the two selection distributions, a heatmap PNG of harmful − benign frequency and JSON.
/// </summary>
public sealed class RoutersCommand : Command<RoutersCommand.Settings>
{
    public sealed class Settings : RuntimeSettings
    {
        [CommandOption("--harmful <FILE>")]
        [Description("JSONL prompts of the harmful set ({\"prompt\"|\"text\": ...} or {\"input_ids\": [[...]]} per line) (required)")]
        public string? Harmful { get; init; }

        [CommandOption("--benign <FILE>")]
        [Description("JSONL prompts of the benign set (required)")]
        public string? Benign { get; init; }

        [CommandOption("--heatmap <FILE>")]
        [Description("PNG heatmap path (default: --output with .png, or routers.png)")]
        public string? Heatmap { get; init; }
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        if (s.Harmful is null || s.Benign is null) throw new UserInputException("both --harmful FILE.jsonl and --benign FILE.jsonl are required");
        foreach (var f in new[] { s.Harmful, s.Benign })
            if (!File.Exists(f)) throw new FileNotFoundException($"{f} does not exist");
        var (model, resolved) = s.LoadModel();
        using var _ = model;
        var harmful = s.ReadJsonl(s.Harmful, resolved.Directory, "--harmful");
        var benign = s.ReadJsonl(s.Benign, resolved.Directory, "--benign");
        var experts = model.NamedModules().Where(m => m.Module is IRoutedExperts { SharesRouting: false }).Select(m => (m.Name, (IRoutedExperts)m.Module)).ToList();
        if (experts.Count == 0) throw new UserInputException($"{resolved.Id} ({model.ModelType}) has no routed experts");
        var h = Count(model, experts, harmful);
        var b = Count(model, experts, benign);

        var layers = new JsonArray();
        var diff = new double[experts.Count, experts.Max(e => (int)e.Item2.NumExperts)];
        var rows = new List<string[]>();
        for (int l = 0; l < experts.Count; l++)
        {
            var ph = Normalize(h[l]);
            var pb = Normalize(b[l]);
            var js = JensenShannon(ph, pb);
            for (int e = 0; e < ph.Length; e++) diff[l, e] = ph[e] - pb[e];
            // The JsonNode overload: Add<T> would go through reflection serialization (not AOT-safe).
            layers.Add((JsonNode)new JsonObject
            {
                ["module"] = experts[l].Name,
                ["num_experts"] = ph.Length,
                ["harmful_counts"] = Arr(h[l]),
                ["benign_counts"] = Arr(b[l]),
                ["harmful_frequency"] = Arr(ph),
                ["benign_frequency"] = Arr(pb),
                ["js_divergence"] = Math.Round(js, 6),
            });
            rows.Add([experts[l].Name, js.ToString("0.0000", System.Globalization.CultureInfo.InvariantCulture), Top(ph), Top(pb)]);
        }
        // The heatmap sits next to the -o file (same name, .png) unless --heatmap names it.
        var png = s.Heatmap ?? (s.Output is null ? "routers.png" : Path.ChangeExtension(s.Output, ".png"));
        var full = Path.GetFullPath(png);
        if (!Directory.Exists(Path.GetDirectoryName(full))) throw new IOException($"cannot write {png}: its folder does not exist");
        // A local folder is named by its last part in the picture: the full path says more about the machine than the model.
        var title = resolved.Origin == Sources.ModelOrigin.Local ? Path.GetFileName(Path.TrimEndingDirectorySeparator(resolved.Id)) : resolved.Id;
        Rendering.RouterHeatmap.Write(full, diff, experts.Select(e => LayerLabel(e.Name)).ToList(), title);
        var json = new JsonObject
        {
            ["schema"] = "moelora.routers/1",
            ["model"] = resolved.Id,
            ["harmful_prompts"] = harmful.Count,
            ["benign_prompts"] = benign.Count,
            ["harmful_tokens"] = harmful.Sum(x => x.Length),
            ["benign_tokens"] = benign.Sum(x => x.Length),
            ["divergence"] = "Jensen-Shannon, log base 2 (0 = same selection distribution, 1 = disjoint)",
            ["heatmap"] = png,
            ["layers"] = layers,
        };
        string[] headers = ["MoE module", "JS divergence", "top harmful", "top benign"];
        var heatmapLine = $"heatmap (harmful − benign selection frequency): {png}";
        Output.Result(s.Format, s.Output, () => json, () =>
        {
            return [Rendering.FitTable.Plain(headers, rows), new Text(heatmapLine + "\n")];
        }, () => $"# Router selection: {resolved.Id}\n\n" + Rendering.MarkdownTable.Render(headers, rows) + "\n" + heatmapLine + "\n");
        return 0;
    }

    static List<long[]> Count(Torch.Models.CausalLm model, List<(string, IRoutedExperts)> experts, List<long[]> prompts)
    {
        var totals = experts.Select(e => new long[e.Item2.NumExperts]).ToList();
        foreach (var p in prompts)
        {
            using var scope = NewDisposeScope();
            var (ids, mask) = RuntimeSettings.Batch([p], model.VocabSize);
            using (no_grad()) using (model.Forward(ids, mask)) { }
            for (int l = 0; l < experts.Count; l++)
            {
                var c = experts[l].Item2.LastSelectedCounts ?? throw new InvalidOperationException($"{experts[l].Item1} did not run");
                for (int e = 0; e < c.Length; e++) totals[l][e] += c[e];
            }
        }
        return totals;
    }

    internal static double[] Normalize(long[] c)
    {
        double sum = c.Sum();
        return c.Select(x => sum == 0 ? 0 : x / sum).ToArray();
    }

    /// <summary>JS(P‖Q) = ½KL(P‖M) + ½KL(Q‖M), M = ½(P+Q), in bits.</summary>
    internal static double JensenShannon(double[] p, double[] q)
    {
        double js = 0;
        for (int i = 0; i < p.Length; i++)
        {
            double m = (p[i] + q[i]) / 2;
            if (p[i] > 0) js += 0.5 * p[i] * Math.Log2(p[i] / m);
            if (q[i] > 0) js += 0.5 * q[i] * Math.Log2(q[i] / m);
        }
        return Math.Max(0, js);
    }

    static string Top(double[] p) => string.Join(", ", p.Select((v, i) => (v, i)).OrderByDescending(x => x.v).Take(3)
        .Select(x => $"e{x.i} {x.v:0.00}"));

    static JsonArray Arr(IEnumerable<long> v) => new(v.Select(x => (JsonNode)JsonValue.Create(x)).ToArray());
    static JsonArray Arr(IEnumerable<double> v) => new(v.Select(x => (JsonNode)JsonValue.Create(Math.Round(x, 6))).ToArray());

    /// <summary>The decoder layer of an experts module (<c>model.layers.3.mlp.experts</c> → 3), else its name.</summary>
    // DBRX's layers are transformer.blocks.{i}; JetMoE routes attention experts too (self_attention.experts).
    internal static string LayerLabel(string module) =>
        System.Text.RegularExpressions.Regex.Match(module, @"(?:layers|blocks)\.(\d+)\.") is { Success: true } m
            ? m.Groups[1].Value + (module.Contains(".self_attention.", StringComparison.Ordinal) ? " attn" : "") : module;
}
