using System.ComponentModel;
using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Plans;
using MoeLora.Cli.Rendering;
using MoeLora.Core.Analysis;
using Spectre.Console;
using Spectre.Console.Cli;
using MoeLora.Core;

namespace MoeLora.Cli.Commands;

/// <summary><c>moelora plan MODEL --output DIR</c>: accelerate + DeepSpeed configs and the PEFT LoraConfig for a plan.</summary>
public sealed class PlanCommand : Command<PlanCommand.Settings>
{
    public sealed class Settings : LoraSettings
    {
        // -o/--output is the result's place in every command; for plan the result is a folder. --output-dir is the old
        // spelling, kept for scripts and hidden from --help.
        [CommandOption("--output-dir <DIR>", IsHidden = true)]
        [Description("Old spelling of -o for plan")]
        public string? OutputDir { get; init; }
    }

    public override int Execute(CommandContext context, Settings settings, CancellationToken cancellationToken)
    {
        var dir = settings.OutputDir ?? settings.Output ?? throw new UserInputException("plan needs --output DIR (the folder to write the launch files into)");
        var lora = settings.BuildLoraConfig();
        var training = settings.BuildTrainingSetup();
        var (spec, resolved) = ModelLoader.Load(settings.Model, settings.ParsedLayout, settings.Revision);
        var report = LoraReport.Build(spec, lora, settings.ParsedPeftVersion, new ReportOptions
        {
            ModelId = resolved.Id,
            Source = resolved.Origin.ToString().ToLowerInvariant(),
            BatchSize = ReportCommand.Positive(settings.BatchSize, "--batch-size"),
            SeqLength = ReportCommand.Positive(settings.SeqLength, "--seq-length"),
            DType = settings.ParsedDType,
            TargetLayers = settings.ParsedTargetLayers,
            Training = training,
        });
        foreach (var r in TrainingMemoryView.Render(report.Training)) Consoles.Out.Write(r);
        // Launch files for a step that runs out of memory are no plan: write nothing and exit non-zero, naming
        // the re-estimated changes that do fit (or saying that none tried does).
        if (!report.Training.Fits)
            throw new UserInputException($"{resolved.Id} does not fit this setup ({report.Training.Verdict}); no launch files were written");
        var paths = LaunchPlan.Write(report, dir);
        foreach (var p in paths) Consoles.Out.MarkupLine($"wrote [bold]{Markup.Escape(p)}[/]");
        return ExitCodes.Ok;
    }
}
