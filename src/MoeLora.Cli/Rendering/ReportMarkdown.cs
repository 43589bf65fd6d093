using System.Globalization;
using System.Text;
using MoeLora.Core.Analysis;
using MoeLora.Core.Modules;

namespace MoeLora.Cli.Rendering;

/// <summary>The report as a self-contained Markdown document.</summary>
public static class ReportMarkdown
{
    public static string Render(LoraReport report)
    {
        var spec = report.Spec;
        var plan = report.Plan;
        var h = report.HiddenStates;
        var sb = new StringBuilder();
        sb.AppendLine(CultureInfo.InvariantCulture, $"# MoE LoRA report: {report.Options.ModelId}");
        sb.AppendLine();
        sb.AppendLine("| | |").AppendLine("|---|---|");
        Row(sb, "Model type", $"`{spec.ModelType}` ({spec.Architecture})");
        Row(sb, "Source", ReportText.SourceText(report));
        Row(sb, "Layout", $"{spec.Layout.Name()}, PEFT {plan.Version}");
        Row(sb, "Layers / hidden / vocab", $"{spec.NumHiddenLayers} / {spec.HiddenSize} / {Units.Count(spec.VocabSize)}");
        Row(sb, "Parameters", Units.Count(spec.Tree.NumParameters));
        if (spec.Moe.IsMoe)
        {
            Row(sb, "Routed experts", $"{spec.Moe.NumExperts}, top-{spec.Moe.ExpertsPerToken}");
            Row(sb, "Shared experts", spec.Moe.SharedExperts.ToString(CultureInfo.InvariantCulture));
            Row(sb, "MoE / dense layers", $"{spec.Moe.MoeLayers.Count} / {spec.Moe.DenseLayers.Count}");
            Row(sb, "Routing", spec.Moe.Routing);
        }
        sb.AppendLine().AppendLine("## Module matching").AppendLine();
        sb.AppendLine(CultureInfo.InvariantCulture, $"LoraConfig: `{plan.Requested.Describe()}`").AppendLine();
        if (ReportText.ConversionText(report) is { } conversion) sb.AppendLine(conversion).AppendLine();
        sb.AppendLine("| target | names | adapters | by location | unique shapes | note |").AppendLine("|---|---:|---:|---|---|---|");
        foreach (var r in report.Breakdown)
        {
            var loc = string.Join(", ", r.ByLocation.Select(kv => $"{kv.Key.Label()} {kv.Value}"));
            sb.AppendLine(CultureInfo.InvariantCulture, $"| `{r.Target}` | {r.NameMatches} | {r.Adapters} | {loc} | {string.Join(" ", r.UniqueShapes)} | {r.Note} |");
        }
        sb.AppendLine().AppendLine("## LoRA adapters").AppendLine();
        sb.AppendLine(CultureInfo.InvariantCulture, $"`trainable params: {Units.Count(plan.TrainableParameters)} || all params: {Units.Count(plan.AllParameters)} || trainable%: {Units.Percent(report.TrainablePercent)}`").AppendLine();
        foreach (var line in AdapterLines(report)) sb.AppendLine(CultureInfo.InvariantCulture, $"- {line}");
        sb.AppendLine().AppendLine("| location | adapters | LoRA parameters |").AppendLine("|---|---:|---:|");
        foreach (var (loc, n, p) in report.ByLocation()) sb.AppendLine(CultureInfo.InvariantCulture, $"| {loc.Label()} | {n} | {Units.Count(p)} |");
        Chart(sb, "Adapters by location", HtmlCharts.AdaptersByLocation(report));
        Chart(sb, "LoRA parameters per layer", HtmlCharts.ParametersPerLayer(report));
        sb.AppendLine().AppendLine("## Hidden states memory").AppendLine();
        sb.AppendLine(CultureInfo.InvariantCulture, $"- Batch {h.BatchSize} × seq {h.SeqLength} × hidden {h.HiddenSize} ({h.DType.Name()}): {Units.Bytes(h.BytesPerState)} per state");
        sb.AppendLine(CultureInfo.InvariantCulture, $"- All {h.NumStates} states: {Units.Bytes(h.AllLayersBytes)}");
        sb.AppendLine(CultureInfo.InvariantCulture, $"- Target layers [{string.Join(", ", h.TargetLayers)}]: {Units.Bytes(h.TargetLayersBytes)} ({h.SavingPercent:F1}% less)");
        sb.Append(TrainingMemoryView.Markdown(report.Training));
        Chart(sb, "Memory breakdown", HtmlCharts.MemoryBreakdown(report.Training));
        if (report.Warnings.Count > 0)
        {
            sb.AppendLine().AppendLine("## Warnings").AppendLine();
            foreach (var w in report.Warnings) sb.AppendLine(CultureInfo.InvariantCulture, $"- **{w.Code}**: {w.Message}");
        }
        sb.AppendLine().AppendLine("## Recommendations").AppendLine();
        var i = 1;
        foreach (var r in report.Recommendations)
        {
            sb.AppendLine(CultureInfo.InvariantCulture, $"{i++}. **{r.Title}**: {r.Detail}");
            var trained = r.TrainableParameters is null ? "" : $" → {Units.Count(r.TrainableParameters.Value)} trainable";
            if (r.Config is not null) sb.AppendLine(CultureInfo.InvariantCulture, $"   `LoraConfig({ReportText.Kwargs(r.Config)})`{trained}");
            else if (trained.Length > 0) sb.AppendLine(CultureInfo.InvariantCulture, $"   {trained}");
        }
        return sb.ToString();
    }

    /// <summary>The adapter facts (instances, sharing, memory, expert coverage) that Markdown and HTML both list.</summary>
    public static IEnumerable<string> AdapterLines(LoraReport report)
    {
        var plan = report.Plan;
        yield return $"Adapter instances: {plan.Targets.Count} ({plan.Targets.Sum(t => t.Tensors.Count)} LoRA tensors)";
        yield return $"Sharing: {ReportText.SharingText(report)}";
        yield return $"Adapter memory: {Units.Bytes(report.AdapterMemoryBytes)} (fp32, as PEFT upcasts)" +
            (report.ModulesToSaveBytes > 0 ? $" + {Units.Bytes(report.ModulesToSaveBytes)} modules_to_save copies ({report.Options.DType.Name()})" : "");
        if (report.Spec.Moe.IsMoe)
            yield return report.Experts.ExpertsWithAdapters == 0
                ? "Experts with adapters: none"
                : $"Experts with adapters: {report.Experts.ExpertsWithAdapters} of {report.Experts.ExpertsPerLayer} in {report.Experts.LayersWithExpertAdapters} of {report.Experts.MoeLayers} MoE layers ({report.Experts.Mode})";
    }

    /// <summary>A chart embedded as a data-URI SVG, so the Markdown file stays self-contained.</summary>
    private static void Chart(StringBuilder sb, string caption, string svg)
    {
        var b64 = Convert.ToBase64String(Encoding.UTF8.GetBytes(svg));
        sb.AppendLine().AppendLine(CultureInfo.InvariantCulture, $"![{caption}](data:image/svg+xml;base64,{b64})");
    }

    private static void Row(StringBuilder sb, string k, string v) => sb.AppendLine(CultureInfo.InvariantCulture, $"| {k} | {v} |");
}
