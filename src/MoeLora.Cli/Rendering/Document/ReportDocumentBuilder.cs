using System.Globalization;
using MoeLora.Cli.Infrastructure;
using MoeLora.Core.Analysis;
using MoeLora.Core.Memory;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Cli.Rendering.Document;

/// <summary>
/// The one place that decides what a report says: model facts, module matching, adapters, hidden-state memory,
/// training memory, warnings, recommendations and the checkpoint check, in that order. The views only format it.
/// </summary>
public static class ReportDocumentBuilder
{
    /// <summary>The location columns of the matching table; any other location is counted in "(+N other)".</summary>
    private static readonly ModuleLocation[] LocationColumns =
    [
        ModuleLocation.Attention, ModuleLocation.Mlp, ModuleLocation.SharedExpert, ModuleLocation.RoutedExpert,
        ModuleLocation.Router, ModuleLocation.Vision,
    ];

    /// <param name="loaded">The checkpoint check of <c>report</c> (null where none was made, e.g. <c>--load-model</c>).</param>
    /// <param name="extra">Sections that follow the analysis (the measured figures of <c>--load-model</c>).</param>
    public static ReportDocument Build(LoraReport report, LoadedModel? loaded = null, IEnumerable<Section>? extra = null)
    {
        var sections = new List<Section>
        {
            Model(report), Matching(report), Adapters(report), HiddenStates(report.HiddenStates), TrainingMemory(report.Training),
        };
        if (report.Warnings.Count > 0) sections.Add(Warnings(report));
        sections.Add(Recommendations(report));
        if (loaded is not null && Checkpoint(loaded) is { } checkpoint) sections.Add(checkpoint);
        sections.AddRange(extra ?? []);
        return new ReportDocument(Text.Of(new Span("MoE LoRA report", Tone.Strong), new Span($": {report.Options.ModelId}")), sections);
    }

    private static Section Model(LoraReport report)
    {
        var spec = report.Spec;
        var moe = spec.Moe;
        var rows = new List<(string, Text)>
        {
            ("Model type", $"{spec.ModelType} ({spec.Architecture})"),
            ("Source", SourceText(report)),
            ("Layout", spec.DerivedLabel is not null
                ? Text.Of(new Span(spec.DerivedLabel, Tone.Warn), new Span($", PEFT {report.Plan.Version}"))
                : $"{spec.Layout.Name()} (transformers {(spec.Layout == Layout.V5 ? "5.x" : "4.57")}), PEFT {report.Plan.Version}"),
            ("Layers / hidden / vocab", $"{spec.NumHiddenLayers} / {spec.HiddenSize} / {Units.Count(spec.VocabSize)}"),
            ("Attention heads (kv)", $"{spec.NumAttentionHeads} ({spec.NumKeyValueHeads})"),
            ("Parameters", Units.Count(spec.Tree.NumParameters)),
            ("Is MoE", moe.IsMoe ? "yes" : "no"),
        };
        if (moe.IsMoe)
        {
            rows.Add(("Routed experts", $"{moe.NumExperts} per MoE layer, top-{moe.ExpertsPerToken}"));
            rows.Add(("Shared experts", moe.SharedExperts == 0 ? "none" : $"{moe.SharedExperts} (intermediate {moe.SharedExpertIntermediateSize})"));
            rows.Add(("MoE / dense layers", $"{moe.MoeLayers.Count} / {moe.DenseLayers.Count}" +
                (moe.DenseLayers.Count is > 0 and <= 8 ? $" (dense: {string.Join(", ", moe.DenseLayers)})" : "")));
            rows.Add(("Routing", moe.Routing));
        }
        return new Section("model", "Model", "model", [new Facts(rows)]);
    }

    private static Section Matching(LoraReport report) => new("matching", "Module matching", "lora.matching", () => MatchingBlocks(report));

    private static List<Block> MatchingBlocks(LoraReport report)
    {
        var blocks = new List<Block> { new Paragraph(Text.Of(new Span("LoraConfig: "), new Span(report.Plan.Requested.Describe(), Tone.Code))) };
        if (ConversionText(report) is { } conversion) blocks.Add(new Paragraph(conversion));
        var columns = new List<Column> { new("target"), new("names", Right: true), new("adapters", Right: true) };
        columns.AddRange(LocationColumns.Select(c => new Column(Short(c), Right: true, Sparse: true)));
        columns.Add(new Column("unique shapes"));
        columns.Add(new Column("note", Sparse: true));
        var rows = report.Breakdown.Select(row =>
        {
            var cells = new List<Text> { new(row.Target, Tone.Code), Number(row.NameMatches), Number(row.Adapters) };
            cells.AddRange(LocationColumns.Select(c => row.ByLocation.TryGetValue(c, out var n) ? Number(n) : "·"));
            var other = row.ByLocation.Where(kv => !LocationColumns.Contains(kv.Key)).Sum(kv => kv.Value);
            cells.Add(string.Join(" ", row.UniqueShapes) + (other > 0 ? $" (+{other} other)" : ""));
            cells.Add(row.Note is null ? Text.Empty : new Text(row.Note, Tone.Warn));
            return (IReadOnlyList<Text>)cells;
        }).ToList();
        blocks.Add(new Table(columns, rows));
        return blocks;
    }

    private static Section Adapters(LoraReport report) => new("adapters", "LoRA adapters", "lora", () => AdaptersBlocks(report));

    private static List<Block> AdaptersBlocks(LoraReport report)
    {
        var plan = report.Plan;
        var facts = new List<(string, Text)>
        {
            ("Adapter instances", $"{plan.Targets.Count} ({plan.Targets.Sum(t => t.Tensors.Count)} LoRA tensors)"),
            ("Sharing", SharingText(report)),
            ("Adapter memory", $"{Units.Bytes(report.AdapterMemoryBytes)} (fp32, as PEFT upcasts)" +
                (report.ModulesToSaveBytes > 0 ? $" + {Units.Bytes(report.ModulesToSaveBytes)} modules_to_save copies ({report.Options.DType.Name()})" : "")),
        };
        if (report.Spec.Moe.IsMoe)
        {
            var e = report.Experts;
            facts.Add(("Experts with adapters", e.ExpertsWithAdapters == 0
                ? new Text("none", Tone.Bad)
                : $"{e.ExpertsWithAdapters} of {e.ExpertsPerLayer} in {e.LayersWithExpertAdapters} of {e.MoeLayers} MoE layers ({e.Mode})"));
        }
        var byLocation = report.ByLocation().Select(x => (IReadOnlyList<Text>)
        [
            x.Location.Label(), Number(x.Adapters), Units.Count(x.Parameters),
            plan.LoraParameters == 0 ? "-" : (100.0 * x.Parameters / plan.LoraParameters).ToString("0.0", CultureInfo.InvariantCulture) + "%",
        ]).ToList();
        return
        [
            new Paragraph(new Text($"trainable params: {Units.Count(plan.TrainableParameters)} || all params: {Units.Count(plan.AllParameters)} || trainable%: {Units.Percent(report.TrainablePercent)}", Tone.Code)),
            new Facts(facts),
            new Table([new("location"), new("adapters", Right: true), new("LoRA parameters", Right: true), new("share", Right: true)], byLocation),
            new Chart("chart-adapters", "Adapters by location", () => HtmlCharts.AdaptersByLocation(report)),
            new Chart("chart-layers", "LoRA parameters per layer", () => HtmlCharts.ParametersPerLayer(report)),
        ];
    }

    private static Section HiddenStates(HiddenStatesMemory h) => new("hidden-states", "Hidden states memory", "memory.hidden_states",
    [
        new Facts(
        [
            ("Batch × seq × hidden", $"{h.BatchSize} × {h.SeqLength} × {h.HiddenSize} ({h.DType.Name()})"),
            ("output_hidden_states", h.Streams == 1
                ? $"{h.NumStates} states × {Units.Bytes(h.BytesPerState)} = {Units.Bytes(h.AllLayersBytes)}"
                : $"{h.NumStates - 1} states × {h.Streams} hyper-connection streams × {Units.Bytes(h.BytesPerState)} + the normed last one = {Units.Bytes(h.AllLayersBytes)}"),
            ($"Target layers [{string.Join(", ", h.TargetLayers)}]",
                Text.Of(new Span($"{Units.Bytes(h.TargetLayersBytes)} ("), new Span($"{h.SavingPercent:F1}% less", Tone.Good), new Span(")"))),
            ("Truncated model", $"{h.TruncatedLayers} blocks; all its states {Units.Bytes(h.TruncatedStatesBytes)}"),
        ]),
    ]);

    /// <summary>The training-memory section (also what <c>plan</c> prints).</summary>
    public static Section TrainingMemory(TrainingMemory m) =>
        new("training-memory", "Training memory (per GPU)", "memory.training", () => TrainingMemoryBlocks(m));

    private static List<Block> TrainingMemoryBlocks(TrainingMemory m)
    {
        var total = Math.Max(1, m.PerGpuBytes);
        var terms = m.Terms.Select(t => (IReadOnlyList<Text>)
        [
            new Text(t.Name, Tone.Code), Units.Bytes(t.Bytes), (100.0 * t.Bytes / total).ToString("0.0", CultureInfo.InvariantCulture) + "%", t.Formula, t.Source,
        ]).ToList();
        terms.Add([new Text("peak", Tone.Strong), new Text(Units.Bytes(m.PerGpuBytes), Tone.Strong), "100%", $"at {m.Phase}", Text.Empty]);
        var blocks = new List<Block>
        {
            new Paragraph(SetupLine(m)),
            new Table([new("term"), new("bytes", Right: true), new("share", Right: true), new("formula"), new("source", Wide: true)], terms),
            new Paragraph(new Text(m.Verdict, m.Fits ? Tone.Good : Tone.Bad)),
        };
        if (!m.Fits && m.Fixes.Count > 0)
            blocks.Add(new Table([new("change"), new("per GPU", Right: true), new("fits")],
                m.Fixes.Select(f => (IReadOnlyList<Text>)[new Text(f.Change, Tone.Code), Units.Bytes(f.PerGpuBytes), f.Fits ? new Text("yes", Tone.Good) : new Text("no", Tone.Bad)]).ToList()));
        blocks.Add(new Chart("chart-memory", "Memory breakdown", () => HtmlCharts.MemoryBreakdown(m)));
        return blocks;
    }

    private static Section Warnings(LoraReport report) => new("warnings", "Warnings", "warnings",
        [new Items(report.Warnings.Select(w => new Item(w.Message, w.Code)).ToList())], Tone.Warn);

    private static Section Recommendations(LoraReport report) => new("recommendations", "Recommendations", "recommendations",
        () => [
            new Steps(report.Recommendations.Select(r => new Step(r.Title, r.Detail,
                r.Config is null ? null : $"LoraConfig({Kwargs(r.Config)})",
                r.TrainableParameters is { } n ? $"trainable params: {Units.Count(n)}" : null)).ToList()),
        ]);

    private const int Shown = 8;

    /// <summary>The checkpoint on disk against the analysis (null when no checkpoint was read).</summary>
    private static Section? Checkpoint(LoadedModel loaded)
    {
        if (loaded.Derived is { } d)
            return new Section("checkpoint", "Derived from checkpoint headers", "checkpoint",
                [new Items(d.Notes.Select(n => new Item(n)).ToList())], Tone.Warn);
        if (loaded.CheckpointError is { } error)
            return new Section("checkpoint", "Checkpoint", "checkpoint",
                [new Items([new Item("The checkpoint could not be read: " + error, Tone: Tone.Bad)])]);
        if (loaded.CrossCheck is not { } c) return null;
        var dtypes = string.Join(", ", c.Dtypes.Select(t => $"{t.Dtype} {Units.Bytes(t.Bytes)}"));
        var blocks = new List<Block> { new Paragraph($"{c.FileCount} file(s), {Units.Bytes(c.SizeOnDisk)} on disk ({dtypes}).") };
        if (c.IsClean)
        {
            blocks.Add(new Paragraph(new Text("Every parameter of the analysis is stored with the expected shape.", Tone.Good)));
        }
        else
        {
            var items = c.Problems.Take(Shown).Select(p => new Item($"{p.Name}: {p.Status} {p.Detail}", Tone: Tone.Bad)).ToList();
            if (c.Problems.Count > Shown) items.Add(new Item($"… and {c.Problems.Count - Shown} more parameters disagree", Marker: "", Tone: Tone.Plain));
            items.AddRange(c.Unexpected.Take(Shown).Select(t => new Item($"{t.Name} is stored but belongs to no module of the analysis", Marker: "?")));
            if (c.Unexpected.Count > Shown) items.Add(new Item($"… and {c.Unexpected.Count - Shown} more unexpected tensors", Marker: "", Tone: Tone.Plain));
            blocks.Add(new Items(items));
        }
        return new Section("checkpoint", "Checkpoint", "checkpoint", blocks);
    }

    /// <summary>
    /// Where the config came from, with the resolver's notes (e.g. that the Hub was unreachable and the catalog copy
    /// was used).
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

    /// <summary>How adapter weights relate: distinct modules, slices of fused tensors, tied pairs.</summary>
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

    /// <summary>One line describing the training step the memory model sized.</summary>
    public static string SetupLine(TrainingMemory m)
    {
        var s = m.Setup;
        var cb = s.Mode == TrainingMode.CircuitBreaker ? $", {m.LayersRun} blocks run" : "";
        return $"{TrainingSetup.Name(s.Mode)} step, batch {s.BatchSize} × seq {s.SeqLength}, {s.DType.Name()}, quantization {TrainingSetup.Name(s.Quantization)}, " +
               $"gradient checkpointing {(s.GradientCheckpointing ? "on" : "off")}, {TrainingSetup.Name(s.Attention)} attention, " +
               $"{s.Gpus} GPU{(s.Gpus == 1 ? "" : "s")} ({TrainingSetup.Name(s.Sharding)}) of {Units.Bytes(s.GpuMemoryBytes)}{cb}";
    }

    private static string Py(System.Text.Json.Nodes.JsonNode? n) => n switch
    {
        null => "None",
        System.Text.Json.Nodes.JsonValue v when v.TryGetValue<bool>(out var b) => b ? "True" : "False",
        System.Text.Json.Nodes.JsonValue v when v.TryGetValue<string>(out var s) => "r\"" + s + "\"",
        _ => n.ToJsonString(),
    };

    private static string Short(ModuleLocation c) => c switch
    {
        ModuleLocation.Attention => "attn",
        ModuleLocation.Mlp => "mlp",
        ModuleLocation.SharedExpert => "shared",
        ModuleLocation.RoutedExpert => "routed",
        _ => c.Name(),
    };

    private static Text Number(long n) => n.ToString(CultureInfo.InvariantCulture);
}
