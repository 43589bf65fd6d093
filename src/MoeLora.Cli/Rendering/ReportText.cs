using System.Globalization;
using MoeLora.Core.Analysis;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;
using Spectre.Console;
using Spectre.Console.Rendering;

namespace MoeLora.Cli.Rendering;

/// <summary>The terminal report: the seed report's sections, with true numbers, as Spectre tables.</summary>
public static class ReportText
{
    private static readonly ModuleLocation[] Columns =
    [
        ModuleLocation.Attention, ModuleLocation.Mlp, ModuleLocation.SharedExpert, ModuleLocation.RoutedExpert,
        ModuleLocation.Router, ModuleLocation.Vision,
    ];

    public static void Write(IAnsiConsole console, LoraReport report)
    {
        foreach (var r in Render(report)) console.Write(r);
    }

    public static IEnumerable<IRenderable> Render(LoraReport report)
    {
        var spec = report.Spec;
        var plan = report.Plan;
        var moe = spec.Moe;

        yield return new Rule($"[bold]MoE LoRA report[/]: {Markup.Escape(report.Options.ModelId)}").LeftJustified();
        var model = new Grid().AddColumn().AddColumn();
        model.AddRow("Model type", $"{spec.ModelType} ({spec.Architecture})");
        model.AddRow("Source", Markup.Escape(SourceText(report)));
        model.AddRow("Layout", spec.DerivedLabel is not null
            ? $"[yellow]{Markup.Escape(spec.DerivedLabel)}[/], PEFT {plan.Version}"
            : $"{spec.Layout.Name()} (transformers {(spec.Layout == MoeLora.Core.Modules.Layout.V5 ? "5.x" : "4.57")}), PEFT {plan.Version}");
        model.AddRow("Layers / hidden / vocab", $"{spec.NumHiddenLayers} / {spec.HiddenSize} / {Units.Count(spec.VocabSize)}");
        model.AddRow("Attention heads (kv)", $"{spec.NumAttentionHeads} ({spec.NumKeyValueHeads})");
        model.AddRow("Parameters", Units.Count(spec.Tree.NumParameters));
        model.AddRow("Is MoE", moe.IsMoe ? "yes" : "no");
        if (moe.IsMoe)
        {
            model.AddRow("Routed experts", $"{moe.NumExperts} per MoE layer, top-{moe.ExpertsPerToken}");
            model.AddRow("Shared experts", moe.SharedExperts == 0 ? "none" : $"{moe.SharedExperts} (intermediate {moe.SharedExpertIntermediateSize})");
            model.AddRow("MoE / dense layers", $"{moe.MoeLayers.Count} / {moe.DenseLayers.Count}" + (moe.DenseLayers.Count is > 0 and <= 8 ? $" (dense: {string.Join(", ", moe.DenseLayers)})" : ""));
            model.AddRow("Routing", Markup.Escape(moe.Routing));
        }
        yield return model;

        yield return new Rule("[bold]Module matching[/]").LeftJustified();
        yield return new Markup(Markup.Escape($"LoraConfig: {plan.Requested.Describe()}") + "\n");
        if (ConversionText(report) is { } conversion) yield return new Markup(Markup.Escape(conversion) + "\n");
        var match = new Table().Border(TableBorder.Rounded).AddColumn("target").AddColumn(new TableColumn("names").RightAligned())
            .AddColumn(new TableColumn("adapters").RightAligned());
        foreach (var c in Columns) match.AddColumn(new TableColumn(Short(c)).RightAligned());
        match.AddColumn("unique shapes").AddColumn("note");
        foreach (var row in report.Breakdown)
        {
            var cells = new List<string> { Markup.Escape(row.Target), row.NameMatches.ToString(CultureInfo.InvariantCulture), row.Adapters.ToString(CultureInfo.InvariantCulture) };
            cells.AddRange(Columns.Select(c => row.ByLocation.TryGetValue(c, out var n) ? n.ToString(CultureInfo.InvariantCulture) : "·"));
            var other = row.ByLocation.Where(kv => !Columns.Contains(kv.Key)).Sum(kv => kv.Value);
            cells.Add(Markup.Escape(string.Join(" ", row.UniqueShapes.Take(4)) + (row.UniqueShapes.Count > 4 ? " …" : "") + (other > 0 ? $" (+{other} other)" : "")));
            cells.Add(row.Note is null ? "" : $"[yellow]{Markup.Escape(row.Note)}[/]");
            match.AddRow(cells.ToArray());
        }
        yield return match;

        yield return new Rule("[bold]LoRA adapters[/]").LeftJustified();
        yield return new Markup(Markup.Escape(
            $"trainable params: {Units.Count(plan.TrainableParameters)} || all params: {Units.Count(plan.AllParameters)} || trainable%: {Units.Percent(report.TrainablePercent)}") + "\n");
        var adapters = new Grid().AddColumn().AddColumn();
        adapters.AddRow("Adapter instances", $"{plan.Targets.Count} ({plan.Targets.Sum(t => t.Tensors.Count)} LoRA tensors)");
        adapters.AddRow("Sharing", Markup.Escape(SharingText(report)));
        adapters.AddRow("Adapter memory", $"{Units.Bytes(report.AdapterMemoryBytes)} (fp32, as PEFT upcasts)" +
            (report.ModulesToSaveBytes > 0 ? $" + {Units.Bytes(report.ModulesToSaveBytes)} modules_to_save copies ({report.Options.DType.Name()})" : ""));
        if (moe.IsMoe)
            adapters.AddRow("Experts with adapters", report.Experts.ExpertsWithAdapters == 0
                ? "[red]none[/]"
                : $"{report.Experts.ExpertsWithAdapters} of {report.Experts.ExpertsPerLayer} in {report.Experts.LayersWithExpertAdapters} of {report.Experts.MoeLayers} MoE layers ({Markup.Escape(report.Experts.Mode)})");
        yield return adapters;
        var dist = new Table().Border(TableBorder.Rounded).AddColumn("location").AddColumn(new TableColumn("adapters").RightAligned())
            .AddColumn(new TableColumn("LoRA parameters").RightAligned()).AddColumn(new TableColumn("share").RightAligned());
        foreach (var (loc, n, p) in report.ByLocation())
            dist.AddRow(loc.Label(), n.ToString(CultureInfo.InvariantCulture), Units.Count(p), plan.LoraParameters == 0 ? "-" : (100.0 * p / plan.LoraParameters).ToString("0.0", CultureInfo.InvariantCulture) + "%");
        yield return dist;

        yield return new Rule("[bold]Hidden states memory[/]").LeftJustified();
        var h = report.HiddenStates;
        var hs = new Grid().AddColumn().AddColumn();
        hs.AddRow("Batch × seq × hidden", $"{h.BatchSize} × {h.SeqLength} × {h.HiddenSize} ({h.DType.Name()})");
        hs.AddRow("output_hidden_states", $"{h.NumStates} states × {Units.Bytes(h.BytesPerState)} = {Units.Bytes(h.AllLayersBytes)}");
        hs.AddRow(Markup.Escape($"Target layers [{string.Join(", ", h.TargetLayers)}]"), $"{Units.Bytes(h.TargetLayersBytes)} ([green]{h.SavingPercent:F1}% less[/])");
        hs.AddRow("Truncated model", $"{h.TruncatedLayers} blocks; all its states {Units.Bytes(h.TruncatedStatesBytes)}");
        yield return hs;
        foreach (var r in TrainingMemoryView.Render(report.Training)) yield return r;

        if (report.Warnings.Count > 0)
        {
            yield return new Rule("[bold yellow]Warnings[/]").LeftJustified();
            foreach (var w in report.Warnings) yield return new Markup($"[yellow]![/] {Markup.Escape(w.Message)}\n");
        }
        yield return new Rule("[bold]Recommendations[/]").LeftJustified();
        var i = 1;
        foreach (var r in report.Recommendations)
        {
            var config = r.Config is null ? "" : $"\n   LoraConfig({Markup.Escape(Kwargs(r.Config))})";
            var trainable = r.TrainableParameters is null ? "" : $"\n   → trainable params: {Units.Count(r.TrainableParameters.Value)}";
            yield return new Markup($"{i++}. [bold]{Markup.Escape(r.Title)}[/]: {Markup.Escape(r.Detail)}{config}{trainable}\n");
        }
    }

    /// <summary>
    /// Where the config came from, with the resolver's notes (e.g. that the Hub was unreachable and the catalog copy
    /// was used): every view prints this same line.
    /// </summary>
    public static string SourceText(LoraReport report)
    {
        var o = report.Options;
        var parts = new[] { o.SourceSummary, o.SourceNote }.Where(x => !string.IsNullOrEmpty(x)).ToList();
        return o.Source + (parts.Count == 0 ? "" : " — " + string.Join("; ", parts));
    }

    /// <summary>What PEFT's transformers-5 MoE rewrite did, in one sentence (null when it did not run).</summary>
    public static string? ConversionText(LoraReport report)
    {
        var plan = report.Plan;
        if (plan.Conversion is not { } conv) return null;
        if (conv.Moved.Count == 0)
        {
            var rules = PeftModelTables.ConversionRules(report.Spec.ModelType)!;
            return $"PEFT {plan.Version}'s transformers-5 rewrite ({conv.Pattern} rules) only maps {string.Join(", ", rules.Map.Select(kv => kv.Key))}: nothing here was moved onto the fused experts.";
        }
        var moved = string.Join(", ", conv.Moved.Select(m => $"{m.Key} → {m.Value}").Distinct());
        return $"PEFT {plan.Version} rewrote the targets for transformers 5 ({conv.Pattern} rules): {moved}" +
               (conv.DoubledGateUp ? "; gate_up_proj gets r and alpha doubled." : ".");
    }

    private static string Short(ModuleLocation c) => c switch
    {
        ModuleLocation.Attention => "attn",
        ModuleLocation.Mlp => "mlp",
        ModuleLocation.SharedExpert => "shared",
        ModuleLocation.RoutedExpert => "routed",
        _ => c.Name(),
    };

    public static string SharingText(LoraReport report)
    {
        var plan = report.Plan;
        var parts = new List<string>();
        var distinct = plan.Targets.Count(t => t.Kind != AdapterKind.Parameter && !t.TiedToEmbedding);
        if (distinct > 0) parts.Add($"{distinct} distinct module adapters (own lora_A/lora_B each)");
        var slices = plan.Targets.Where(t => t.IsPerExpertSlices).ToList();
        if (slices.Count > 0) parts.Add($"{slices.Count} fused-expert adapters = {slices.Sum(t => t.NumExperts)} per-expert slices (rank r rows of one lora_A, r columns of one lora_B per expert)");
        var single = plan.Targets.Count(t => t.Kind == AdapterKind.Parameter && !t.IsPerExpertSlices);
        if (single > 0) parts.Add($"{single} parameter adapters");
        var tied = plan.Targets.Count(t => t.TiedToEmbedding);
        if (tied > 0) parts.Add($"{tied} tied to the embedding adapter (shared storage)");
        return string.Join("; ", parts);
    }

    /// <summary>LoraConfig keyword arguments as Python would spell them.</summary>
    public static string Kwargs(LoraConfig config)
    {
        var o = config.ToKwargsJson();
        return string.Join(", ", o.Where(kv => kv.Key != "task_type").Select(kv => $"{kv.Key}={Py(kv.Value)}"));
    }

    private static string Py(System.Text.Json.Nodes.JsonNode? n) => n switch
    {
        null => "None",
        System.Text.Json.Nodes.JsonValue v when v.TryGetValue<bool>(out var b) => b ? "True" : "False",
        System.Text.Json.Nodes.JsonValue v when v.TryGetValue<string>(out var s) => "r\"" + s + "\"",
        _ => n.ToJsonString(),
    };
}
