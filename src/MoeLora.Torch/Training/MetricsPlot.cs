using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using ScottPlot;

namespace MoeLora.Torch.Training;

/// <summary>Loss curves from metrics.jsonl: PNG through ScottPlot, and an SVG fallback if its native renderer cannot load.</summary>
public static class MetricsPlot
{
    static readonly (string Key, string Label)[] Series =
        [("retain_loss", "retain loss"), ("cb_loss", "RR loss"), ("cb_cosine", "CB cosine"), ("retain_coeff", "c_retain / a"), ("cb_coeff", "c_cb / a")];

    // metrics.jsonl is this trainer's own file; a torn last line (the process was killed mid-write) is skipped.
    static JsonObject? Row(string line)
    {
        if (line.Length == 0) return null;
        try { return JsonNode.Parse(line) is JsonObject o && o["step"] is JsonValue ? o : null; }
        catch (System.Text.Json.JsonException) { return null; }
    }

    public const int Width = 1000;
    public const int Height = 720;

    /// <summary>The panels, top to bottom: retain loss on its own scale, then the 0..1 curves (RR loss, cosine, schedule).</summary>
    public static readonly string[][] Panels = [["retain loss"], ["RR loss", "CB cosine", "c_retain / a", "c_cb / a"]];

    /// <summary>
    /// Two panels sharing the step axis: the retain loss (a cross-entropy, often several units) would flatten the
    /// rerouting curves, which live in 0..1, if they shared its y axis. Legends sit right of each panel, outside
    /// the data, so they cover no step.
    /// </summary>
    public static ScottPlot.Multiplot Build(IReadOnlyList<(string Label, List<(double X, double Y)> Points)> data)
    {
        var figure = new ScottPlot.Multiplot();
        figure.AddPlots(Panels.Length);
        var plots = figure.GetPlots();
        for (var p = 0; p < Panels.Length; p++)
        {
            var plt = plots[p];
            plt.Font.Set("DejaVu Sans");
            foreach (var (label, pts) in data.Where(d => Panels[p].Contains(d.Label)))
            {
                if (pts.Count == 0) continue;
                var sc = plt.Add.Scatter(pts.Select(q => q.X).ToArray(), pts.Select(q => q.Y).ToArray());
                sc.LegendText = label;
                sc.MarkerSize = 0;
                sc.LineWidth = 2;
            }
            plt.ShowLegend(ScottPlot.Edge.Right);
            plt.XLabel("step");
            // The same margins in both panels, so their step axes line up although their legends differ in width.
            plt.Layout.Fixed(new PixelPadding(80, 190, 50, p == 0 ? 40 : 20));
        }
        plots[0].Title("circuit-breaker training");
        plots[0].YLabel("retain loss");
        plots[1].YLabel("RR loss, cosine, schedule");
        figure.SharedAxes.ShareX(plots);
        return figure;
    }

    /// <summary>Writes <c>{basePath}.png</c> (or <c>.svg</c>); returns the file written.</summary>
    public static string Write(string metricsJsonl, string basePath)
    {
        var rows = File.Exists(metricsJsonl)
            ? File.ReadAllLines(metricsJsonl).Select(Row).OfType<JsonObject>().ToList() : [];
        double alpha = rows.Select(r => (r["retain_coeff"]?.GetValue<double>() ?? 0) + (r["cb_coeff"]?.GetValue<double>() ?? 0)).DefaultIfEmpty(1).Max();
        var data = Series.Select(s => (s.Label, Points: rows.Where(r => r[s.Key] is JsonValue)
            .Select(r => (X: r["step"]!.GetValue<double>(), Y: r[s.Key]!.GetValue<double>() / (s.Key.EndsWith("coeff", StringComparison.Ordinal) ? alpha : 1))).ToList())).ToList();
        try
        {
            Build(data).SavePng(basePath + ".png", Width, Height);
            return basePath + ".png";
        }
        catch (Exception e) when (e is DllNotFoundException or TypeInitializationException or BadImageFormatException)
        {
            File.WriteAllText(basePath + ".svg", Svg(data));
            return basePath + ".svg";
        }
    }

    internal static string Svg(List<(string Label, List<(double X, double Y)> Points)> data)
    {
        const int w = 900, h = 500, m = 50;
        var all = data.SelectMany(d => d.Points).ToList();
        double x0 = all.Count > 0 ? all.Min(p => p.X) : 0, x1 = all.Count > 0 ? all.Max(p => p.X) : 1;
        double y0 = Math.Min(0, all.Count > 0 ? all.Min(p => p.Y) : 0), y1 = all.Count > 0 ? all.Max(p => p.Y) : 1;
        if (x1 <= x0) x1 = x0 + 1; if (y1 <= y0) y1 = y0 + 1;
        string[] colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];
        var sb = new StringBuilder($"<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\"><rect width=\"100%\" height=\"100%\" fill=\"white\"/>");
        for (int i = 0; i < data.Count; i++)
        {
            var pts = string.Join(" ", data[i].Points.Select(p => string.Create(CultureInfo.InvariantCulture,
                $"{m + (p.X - x0) / (x1 - x0) * (w - 2 * m):F1},{h - m - (p.Y - y0) / (y1 - y0) * (h - 2 * m):F1}")));
            sb.Append($"<polyline fill=\"none\" stroke=\"{colors[i % colors.Length]}\" points=\"{pts}\"/>");
            sb.Append($"<text x=\"{w - 200}\" y=\"{m + 16 * i}\" fill=\"{colors[i % colors.Length]}\" font-size=\"12\">{data[i].Label}</text>");
        }
        return sb.Append("</svg>").ToString();
    }
}
