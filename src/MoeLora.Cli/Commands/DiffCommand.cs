using System.ComponentModel;
using System.Text;
using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Rendering;
using MoeLora.Core.Analysis;
using MoeLora.Core.Peft;
using Spectre.Console;
using Spectre.Console.Cli;
using MoeLora.Core;

namespace MoeLora.Cli.Commands;

/// <summary>
/// <c>moelora diff MODEL_A MODEL_B</c>, or <c>moelora diff MODEL --lora-config A.json --lora-config-b B.json</c>:
/// the seed report's "MoE vs Dense" comparison, side by side, from two real analyses under the same training setup.
/// </summary>
public sealed class DiffCommand : Command<DiffCommand.Settings>
{
    public sealed class Settings : LoraSettings
    {
        [CommandArgument(1, "[MODEL_B]")]
        [Description("The second model (default: MODEL again, with --lora-config-b)")]
        public string? ModelB { get; init; }

        [CommandOption("--lora-config-b <FILE>")]
        [Description("LoraConfig for the second side: a file or an adapter folder, as --lora-config (default: the same LoRA options as the first)")]
        public string? LoraConfigB { get; init; }
    }

    public override int Execute(CommandContext context, Settings settings, CancellationToken cancellationToken)
    {
        if (settings.ModelB is null && settings.LoraConfigB is null)
            throw new UserInputException("diff needs MODEL_B or --lora-config-b (two models, or two LoraConfigs on one model)");
        var loraA = settings.BuildLoraConfig();
        LoraConfig loraB;
        if (settings.LoraConfigB is null) loraB = loraA;
        else
        {
            var fileB = LoraSettings.LoraConfigPath(settings.LoraConfigB);
            if (!File.Exists(fileB)) throw new FileNotFoundException($"--lora-config-b {fileB} does not exist");
            loraB = LoraConfig.FromJson(File.ReadAllText(fileB), fileB);
            loraB.Validate();
        }
        var a = Analyse(settings, settings.Model, loraA);
        var b = Analyse(settings, settings.ModelB ?? settings.Model, loraB);
        Output.Result(settings.Format, settings.Output, () => DiffRows.ToJson(a, b), () => Text(a, b), () => Markdown(a, b));
        return ExitCodes.Ok;
    }

    private static LoraReport Analyse(Settings settings, string model, LoraConfig lora)
    {
        var (spec, resolved) = ModelLoader.Load(model, settings.Layout, settings.Revision);
        return LoraReport.Build(spec, lora, settings.ParsedPeftVersion, new ReportOptions
        {
            ModelId = resolved.Id,
            Source = resolved.Origin.ToString().ToLowerInvariant(),
            BatchSize = ReportCommand.Positive(settings.BatchSize, "--batch-size"),
            SeqLength = ReportCommand.Positive(settings.SeqLength, "--seq-length"),
            DType = settings.DType,
            TargetLayers = null, // each model gets its own default [L/4, L/2]
            Training = settings.BuildTrainingSetup() with { TargetLayers = null },
        });
    }

    private static string Label(LoraReport r, string side) => $"{side}: {r.Options.ModelId}";

    private static IEnumerable<Spectre.Console.Rendering.IRenderable> Text(LoraReport a, LoraReport b)
    {
        yield return new Rule($"[bold]MoeLora diff[/]: {Markup.Escape(a.Options.ModelId)} vs {Markup.Escape(b.Options.ModelId)}").LeftJustified();
        yield return new Markup(Markup.Escape(TrainingMemoryView.SetupLine(a.Training)) + "\n");
        yield return FitTable.Plain(["aspect", Label(a, "A"), Label(b, "B")], DiffRows.Build(a, b).Select(r => (IReadOnlyList<string>)[r.Aspect, r.A, r.B]));
    }

    private static string Markdown(LoraReport a, LoraReport b)
    {
        var sb = new StringBuilder();
        sb.AppendLine($"# MoeLora diff: {a.Options.ModelId} vs {b.Options.ModelId}").AppendLine();
        sb.AppendLine(TrainingMemoryView.SetupLine(a.Training) + ".").AppendLine();
        sb.AppendLine($"| Aspect | A: {a.Options.ModelId} | B: {b.Options.ModelId} |").AppendLine("|---|---|---|");
        foreach (var r in DiffRows.Build(a, b)) sb.AppendLine($"| {r.Aspect} | {E(r.A)} | {E(r.B)} |");
        return sb.ToString();
    }

    private static string E(string s) => s.Replace("|", "\\|", StringComparison.Ordinal);
}
