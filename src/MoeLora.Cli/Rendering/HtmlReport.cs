using System.Globalization;
using System.Net;
using System.Text;
using MoeLora.Core.Analysis;
using MoeLora.Core.Modules;

namespace MoeLora.Cli.Rendering;

/// <summary>
/// A self-contained HTML report: the Markdown report's content as HTML tables plus three charts drawn with ScottPlot
/// (memory breakdown, adapters by location, LoRA parameters per layer), embedded as base64 SVG images.
/// </summary>
public static class HtmlReport
{
    public static string Render(LoraReport report)
    {
        var spec = report.Spec;
        var plan = report.Plan;
        var m = report.Training;
        var sb = new StringBuilder();
        sb.AppendLine("<!DOCTYPE html>");
        sb.AppendLine("<html lang=\"en\"><head><meta charset=\"utf-8\">");
        sb.AppendLine(CultureInfo.InvariantCulture, $"<title>MoE LoRA report: {E(report.Options.ModelId)}</title>");
        sb.AppendLine("<style>body{font-family:'DejaVu Sans',system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}" +
                      "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}" +
                      "td.n{text-align:right;font-variant-numeric:tabular-nums}.ok{color:#067d17}.bad{color:#b00020}" +
                      "figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;padding:0 3px}</style>");
        sb.AppendLine("</head><body>");
        sb.AppendLine(CultureInfo.InvariantCulture, $"<h1>MoE LoRA report: {E(report.Options.ModelId)}</h1>");

        sb.AppendLine("<section id=\"model\"><h2>Model</h2><table>");
        Row(sb, "Model type", $"{spec.ModelType} ({spec.Architecture})");
        Row(sb, "Source", ReportText.SourceText(report));
        Row(sb, "Layout / PEFT", $"{spec.Layout.Name()}, PEFT {plan.Version}");
        Row(sb, "Layers / hidden / vocab", $"{spec.NumHiddenLayers} / {spec.HiddenSize} / {Units.Count(spec.VocabSize)}");
        Row(sb, "Parameters", Units.Count(spec.Tree.NumParameters));
        if (spec.Moe.IsMoe)
        {
            Row(sb, "Routed experts", $"{spec.Moe.NumExperts}, top-{spec.Moe.ExpertsPerToken}");
            Row(sb, "Shared experts", spec.Moe.SharedExperts.ToString(CultureInfo.InvariantCulture));
            Row(sb, "MoE / dense layers", $"{spec.Moe.MoeLayers.Count} / {spec.Moe.DenseLayers.Count}");
            Row(sb, "Routing", spec.Moe.Routing);
        }
        sb.AppendLine("</table></section>");

        sb.AppendLine("<section id=\"matching\"><h2>Module matching</h2>");
        sb.AppendLine(CultureInfo.InvariantCulture, $"<p>LoraConfig: <code>{E(plan.Requested.Describe())}</code></p>");
        if (ReportText.ConversionText(report) is { } conversion) sb.AppendLine(CultureInfo.InvariantCulture, $"<p>{E(conversion)}</p>");
        sb.AppendLine("<table><tr><th>target</th><th>names</th><th>adapters</th><th>by location</th><th>unique shapes</th><th>note</th></tr>");
        foreach (var r in report.Breakdown)
        {
            var loc = string.Join(", ", r.ByLocation.Select(kv => $"{kv.Key.Label()} {kv.Value}"));
            sb.AppendLine(CultureInfo.InvariantCulture,
                $"<tr><td><code>{E(r.Target)}</code></td><td class=\"n\">{r.NameMatches}</td><td class=\"n\">{r.Adapters}</td><td>{E(loc)}</td><td>{E(string.Join(" ", r.UniqueShapes))}</td><td>{E(r.Note ?? "")}</td></tr>");
        }
        sb.AppendLine("</table></section>");

        sb.AppendLine("<section id=\"adapters\"><h2>LoRA adapters</h2>");
        sb.AppendLine(CultureInfo.InvariantCulture, $"<p><code>trainable params: {Units.Count(plan.TrainableParameters)} || all params: {Units.Count(plan.AllParameters)} || trainable%: {Units.Percent(report.TrainablePercent)}</code></p>");
        sb.AppendLine("<ul>");
        foreach (var line in ReportMarkdown.AdapterLines(report)) sb.AppendLine(CultureInfo.InvariantCulture, $"<li>{E(line)}</li>");
        sb.AppendLine("</ul>");
        sb.AppendLine("<table><tr><th>location</th><th>adapters</th><th>LoRA parameters</th></tr>");
        foreach (var (loc, n, p) in report.ByLocation())
            sb.AppendLine(CultureInfo.InvariantCulture, $"<tr><td>{E(loc.Label())}</td><td class=\"n\">{n}</td><td class=\"n\">{Units.Count(p)}</td></tr>");
        sb.AppendLine("</table>");
        Figure(sb, "chart-adapters", "Adapters by location", HtmlCharts.AdaptersByLocation(report));
        Figure(sb, "chart-layers", "LoRA parameters per layer", HtmlCharts.ParametersPerLayer(report));
        sb.AppendLine("</section>");

        sb.AppendLine("<section id=\"training-memory\"><h2>Training memory (per GPU)</h2>");
        sb.AppendLine(CultureInfo.InvariantCulture, $"<p>{E(TrainingMemoryView.SetupLine(m))}.</p>");
        sb.AppendLine("<table><tr><th>term</th><th>bytes</th><th>formula</th><th>source</th></tr>");
        foreach (var t in m.Terms)
            sb.AppendLine(CultureInfo.InvariantCulture, $"<tr><td><code>{E(t.Name)}</code></td><td class=\"n\">{Units.Bytes(t.Bytes)}</td><td>{E(t.Formula)}</td><td>{E(t.Source)}</td></tr>");
        sb.AppendLine(CultureInfo.InvariantCulture, $"<tr><th>peak</th><th class=\"n\">{Units.Bytes(m.PerGpuBytes)}</th><td>at {E(m.Phase)}</td><td></td></tr></table>");
        sb.AppendLine(CultureInfo.InvariantCulture, $"<p class=\"{(m.Fits ? "ok" : "bad")}\"><strong>{E(m.Verdict)}</strong></p>");
        if (!m.Fits && m.Fixes.Count > 0)
        {
            sb.AppendLine("<table><tr><th>change</th><th>per GPU</th><th>fits</th></tr>");
            foreach (var f in m.Fixes)
                sb.AppendLine(CultureInfo.InvariantCulture, $"<tr><td><code>{E(f.Change)}</code></td><td class=\"n\">{Units.Bytes(f.PerGpuBytes)}</td><td>{(f.Fits ? "yes" : "no")}</td></tr>");
            sb.AppendLine("</table>");
        }
        Figure(sb, "chart-memory", "Memory breakdown", HtmlCharts.MemoryBreakdown(m));
        sb.AppendLine("</section>");

        var h = report.HiddenStates;
        sb.AppendLine("<section id=\"hidden-states\"><h2>Hidden states</h2><table>");
        Row(sb, "Batch × seq × hidden", $"{h.BatchSize} × {h.SeqLength} × {h.HiddenSize} ({h.DType.Name()})");
        Row(sb, "All states", $"{h.NumStates} × {Units.Bytes(h.BytesPerState)} = {Units.Bytes(h.AllLayersBytes)}");
        Row(sb, $"Target layers [{string.Join(", ", h.TargetLayers)}]", $"{Units.Bytes(h.TargetLayersBytes)} ({h.SavingPercent:F1}% less)");
        sb.AppendLine("</table></section>");

        if (report.Warnings.Count > 0)
        {
            sb.AppendLine("<section id=\"warnings\"><h2>Warnings</h2><ul>");
            foreach (var w in report.Warnings) sb.AppendLine(CultureInfo.InvariantCulture, $"<li><strong>{E(w.Code)}</strong>: {E(w.Message)}</li>");
            sb.AppendLine("</ul></section>");
        }
        sb.AppendLine("<section id=\"recommendations\"><h2>Recommendations</h2><ol>");
        foreach (var r in report.Recommendations)
        {
            var config = r.Config is null ? "" : $"<br><code>LoraConfig({E(ReportText.Kwargs(r.Config))})</code>";
            if (r.TrainableParameters is { } trainable) config += $" → {Units.Count(trainable)} trainable";
            sb.AppendLine(CultureInfo.InvariantCulture, $"<li><strong>{E(r.Title)}</strong>: {E(r.Detail)}{config}</li>");
        }
        sb.AppendLine("</ol></section>");
        sb.AppendLine("</body></html>");
        return sb.ToString();
    }

    // The chart carries its own title; a caption repeating it would say it twice.
    private static void Figure(StringBuilder sb, string id, string caption, string svg)
    {
        var b64 = Convert.ToBase64String(Encoding.UTF8.GetBytes(svg));
        sb.AppendLine(CultureInfo.InvariantCulture, $"<figure id=\"{id}\"><img alt=\"{E(caption)}\" src=\"data:image/svg+xml;base64,{b64}\"></figure>");
    }

    private static void Row(StringBuilder sb, string k, string v) => sb.AppendLine(CultureInfo.InvariantCulture, $"<tr><th>{E(k)}</th><td>{E(v)}</td></tr>");

    private static string E(string s) => WebUtility.HtmlEncode(s);
}
