using System.ComponentModel;
using System.Globalization;
using MoeLora.Cli.Infrastructure;
using MoeLora.Sources.Adapters;
using Spectre.Console;
using Spectre.Console.Cli;

namespace MoeLora.Cli.Commands;

/// <summary><c>moelora adapter inspect DIR [--model MODEL]</c>: what a PEFT LoRA adapter adapts, its layout and traps.</summary>
public sealed class AdapterInspectCommand : Command<AdapterInspectCommand.Settings>
{
    public sealed class Settings : ResultSettings
    {
        [CommandArgument(0, "<DIR>")]
        [Description("PEFT adapter folder (adapter_config.json + adapter_model.safetensors)")]
        public string Dir { get; init; } = "";

        [CommandOption("--model <MODEL>")]
        [Description("Model the adapter is for (Hub id or local folder): flags keys it would not load (transformers v5 layout) (default: none)")]
        public string? Model { get; init; }

        [CommandOption("--revision <REV>")]
        [Description("Hub revision of --model (default main)")]
        public string Revision { get; init; } = "main";
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        var folder = AdapterFolder.Read(s.Dir);
        IReadOnlySet<string>? modules = null, parameters = null;
        ExpertLayout? layout = null;
        if (s.Model is not null)
        {
            var (spec, _) = ModelLoader.Load(s.Model, MoeLora.Core.Modules.Layout.V5, s.Revision);
            modules = spec.Tree.Modules.Select(m => m.Name).ToHashSet(StringComparer.Ordinal);
            parameters = spec.Tree.Parameters.Select(p => p.Name).ToHashSet(StringComparer.Ordinal);
            layout = ExpertLayout.FromSpec(spec, $"--model {s.Model}");
        }
        var inspection = AdapterInspector.Inspect(folder, modules, parameters, layout);
        bool rslora = LoraPairs.Bool(folder.Config, "use_rslora");
        var lines = new List<string>
        {
            $"adapter      {s.Dir}",
            $"layout       {inspection.Layout}",
            $"peft         {inspection.PeftVersion ?? "(not recorded)"}",
            $"by location  {string.Join(", ", inspection.ByLocation.Select(kv => $"{kv.Key} {kv.Value}"))}",
        };
        string[] headers = ["module", "parameter", "location", "r", "alpha", "scaling", "experts", "lora_A", "lora_B"];
        // One row per distinct (module pattern, parameter) with layer indices folded, so big adapters stay readable.
        var rows = inspection.Pairs.GroupBy(p => (Name: System.Text.RegularExpressions.Regex.Replace(p.Module, @"\.\d+\.", ".*."), p.Parameter, p.Rank, p.Alpha, A: p.A.ShapeText, B: p.B.ShapeText, p.Location, p.Experts))
            .Select(g => (IReadOnlyList<string>)[$"{g.Key.Name} ×{g.Count()}", g.Key.Parameter ?? "", g.Key.Location, g.Key.Rank.ToString(CultureInfo.InvariantCulture),
                g.Key.Alpha.ToString(CultureInfo.InvariantCulture), g.First().Scaling(rslora).ToString("0.####", CultureInfo.InvariantCulture),
                g.Key.Experts.ToString(CultureInfo.InvariantCulture), g.Key.A, g.Key.B]).ToList();
        var traps = inspection.Traps.Count == 0 ? "no traps found\n" : "traps:\n" + string.Join("\n", inspection.Traps.Select(t => "! " + t)) + "\n";
        Output.Result(s.Format, s.Output, () => inspection.ToJson(rslora), () =>
        {
            return [new Text(string.Join("\n", lines) + "\n"), Rendering.FitTable.Plain(headers, rows, TableBorder.Simple), new Text(traps)];
        }, () => "```text\n" + string.Join("\n", lines) + "\n```\n\n" + Rendering.MarkdownTable.Render(headers, rows) + "\n" + traps);
        return ExitCodes.Ok;
    }
}

/// <summary><c>moelora adapter convert DIR --to peft-v5|per-expert|vllm|sglang -o OUT [--model MODEL]</c>: exact re-layouts of expert LoRA.</summary>
public sealed class AdapterConvertCommand : Command<AdapterConvertCommand.Settings>
{
    public sealed class Settings : CommandSettings
    {
        [CommandArgument(0, "<DIR>")]
        [Description("PEFT adapter folder to convert")]
        public string Dir { get; init; } = "";

        [CommandOption("--to <FORMAT>")]
        [Description("peft-v5 (fused ParamWrapper), per-expert (PEFT <= 0.18 keys), vllm or sglang (what their loaders read, one rank) (required)")]
        public string? To { get; init; }

        [CommandOption("--model <MODEL>")]
        [Description("Model the adapter is for (Hub id or local folder): its gate/up order and per-expert names. Default: the model PEFT recorded in adapter_config.json (auto_mapping)")]
        public string? Model { get; init; }

        [CommandOption("--revision <REV>")]
        [Description("Hub revision of --model (default main)")]
        public string Revision { get; init; } = "main";

        [CommandOption("-o|--output <DIR>")]
        [Description("New or empty folder for the converted adapter (written to a temporary sibling, then renamed) (required)")]
        public string? Output { get; init; }

        public override ValidationResult Validate() => OptionChecks.First(
            To is null ? "--to is required: " + string.Join(", ", AdapterConvert.Targets) : OptionChecks.OneOf(To, "--to", AdapterConvert.Targets),
            Output is null ? "--output DIR is required (a new or empty folder)" : null);
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        var input = AdapterFolder.Read(s.Dir);
        ExpertLayout? given = null;
        if (s.Model is not null)
        {
            var (spec, _) = ModelLoader.Load(s.Model, MoeLora.Core.Modules.Layout.V5, s.Revision);
            given = ExpertLayout.FromSpec(spec, $"--model {s.Model}");
        }
        var layout = AdapterConvert.Resolve(input, given);
        var output = AdapterConvert.Convert(input, s.To!, layout);
        var before = AdapterDelta.PerExpert(input, layout);
        var after = AdapterDelta.PerExpert(output, layout);
        // The conversion only moves bytes; prove it before writing anything.
        double worst = 0;
        foreach (var (k, d) in before)
        {
            if (!after.TryGetValue(k, out var e)) throw new InvalidOperationException($"conversion lost the delta of {k}");
            for (int o = 0; o < d.GetLength(0); o++) for (int i = 0; i < d.GetLength(1); i++) worst = Math.Max(worst, Math.Abs(d[o, i] - e[o, i]));
        }
        if (worst != 0 || after.Count != before.Count) throw new InvalidOperationException($"conversion changed ΔW (max |diff| {worst})");
        output.Write(s.Output!);
        Consoles.Out.MarkupLine($"[green]converted[/] {before.Count} adapted weights to {Markup.Escape(s.To!)} in {Markup.Escape(s.Output!)} (ΔW per expert identical; model from {Markup.Escape(layout.Source)})");
        if (s.To is "per-expert" && layout.PeftConvertsPerExpert == false)
            Consoles.Out.MarkupLine($"[yellow]note[/] PEFT 0.19+ does not read per-expert adapters of {Markup.Escape(layout.ModelType!)} (no entry in its MoE conversion table): this folder is for PEFT <= 0.18 and 2-D serving loaders");
        if (s.To is "vllm" or "sglang")
            Consoles.Out.MarkupLine($"serve with --max-lora-rank {LoraPairs.Int(output.Config, "r", 8)} or more (one r for the whole adapter)");
        return ExitCodes.Ok;
    }
}
