using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Rendering;
using MoeLora.Core.Analysis;
using Spectre.Console.Cli;

namespace MoeLora.Cli.Commands;

/// <summary><c>moelora report [MODEL]</c>: the config-only analysis of LoRA on a model.</summary>
public sealed class ReportCommand : Command<ReportCommand.Settings>
{
    public sealed class Settings : LoraSettings
    {
        [System.ComponentModel.Description("Load the model (TorchSharp), inject the LoRA and show measured figures next to the predicted ones")]
        [CommandOption("--load-model")]
        public bool LoadModel { get; init; }

        [System.ComponentModel.Description("With --load-model: cpu (default) or cuda")]
        [CommandOption("--device <DEVICE>")]
        public string Device { get; init; } = "cpu";

        [System.ComponentModel.Description("With --load-model: 'random' builds the model from config.json with seeded random weights instead of loading the checkpoint")]
        [CommandOption("--init <INIT>")]
        public string? Init { get; init; }

        [System.ComponentModel.Description("With --load-model: seed for random weights, LoRA init and input tokens (default 0)")]
        [CommandOption("--seed <SEED>")]
        public long Seed { get; init; }

        [System.ComponentModel.Description("With --load-model: tokens of the sequence used for the gradient-flow backward (default 4, so that some experts go unselected)")]
        [CommandOption("--grad-tokens <N>")]
        public int GradTokens { get; init; } = 4;
    }

    public override int Execute(CommandContext context, Settings settings, CancellationToken cancellationToken)
    {
        var format = settings.ParsedFormat;
        var lora = settings.BuildLoraConfig();
        var (spec, resolved) = ModelLoader.Load(settings.Model, settings.ParsedLayout, settings.Revision);
        var report = LoraReport.Build(spec, lora, settings.ParsedPeftVersion, new ReportOptions
        {
            ModelId = resolved.Id,
            Source = resolved.Origin.ToString().ToLowerInvariant(),
            SourceNote = resolved.Notes.Count > 0 ? string.Join(" ", resolved.Notes) : null,
            SourceSummary = ModelLoader.Summary(resolved),
            BatchSize = Positive(settings.BatchSize, "--batch-size"),
            SeqLength = Positive(settings.SeqLength, "--seq-length"),
            DType = settings.ParsedDType,
            TargetLayers = settings.ParsedTargetLayers,
        });
        if (settings.LoadModel) return LoadModelMeasurement.Run(report, resolved, settings, format);
        switch (format)
        {
            case "json": Output.Json(report.ToJson(), settings.Output); break;
            case "markdown": Output.Text(ReportMarkdown.Render(report), settings.Output); break;
            default: Output.Renderables(ReportText.Render(report), settings.Output); break;
        }
        return ExitCodes.Ok;
    }

    internal static int Positive(int value, string option) =>
        value > 0 ? value : throw new ArgumentException($"{option} must be a positive integer, got {value}");
}
