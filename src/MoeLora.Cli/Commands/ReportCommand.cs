using System.ComponentModel;
using MoeLora.Cli.Infrastructure;
using System.Text.Json.Nodes;
using MoeLora.Cli.Options;
using MoeLora.Cli.Rendering;
using MoeLora.Cli.Rendering.Document;
using MoeLora.Core.Analysis;
using Spectre.Console.Cli;
using MoeLora.Core;

namespace MoeLora.Cli.Commands;

/// <summary><c>moelora report [MODEL]</c>: the config-only analysis of LoRA on a model.</summary>
public sealed class ReportCommand : Command<ReportCommand.Settings>
{
    public sealed class Settings : LoraSettings
    {
        protected override IReadOnlyCollection<OutputFormat> Formats => [OutputFormat.Text, OutputFormat.Json, OutputFormat.Markdown, OutputFormat.Html];

        public override Spectre.Console.ValidationResult Validate() => base.Validate() is { Successful: false } failed ? failed
            : OptionChecks.First(OptionChecks.AtLeast(GradTokens, 1, "--grad-tokens"),
                OptionChecks.Parses(() => _ = ParsedMeasureSteps, "--measure-steps"),
                MeasureSteps is not null && !LoadModel ? "--measure-steps needs --load-model (the steps run on the loaded model)" : null,
                OptionChecks.AtLeast(StepTokens, 2, "--step-tokens"),
                OptionChecks.AtLeast(StepBatch, 1, "--step-batch"),
                OptionChecks.AtLeast(StepRepeats, 1, "--step-repeats"));

        /// <summary>The step words --measure-steps accepts, in the order they are measured.</summary>
        internal static readonly string[] StepModes = ["lora", "cb"];

        [CommandOption("--checkpoint-headers")]
        [Description("Also read safetensors headers from the Hub (local and cached checkpoints are always checked) (default off)")]
        public bool CheckpointHeaders { get; init; }

        [Description("Load the model (TorchSharp), inject the LoRA and show measured figures next to the predicted ones")]
        [CommandOption("--load-model")]
        public bool LoadModel { get; init; }

        [Description("With --load-model: " + SharedOptions.DeviceHelp)]
        [CommandOption(SharedOptions.Device)]
        public DeviceName Device { get; init; } = DeviceName.Cpu;

        [Description("With --load-model: 'random' builds the model from config.json with seeded random weights instead of loading the checkpoint (default: load the checkpoint)")]
        [CommandOption("--init <INIT>")]
        public string? Init { get; init; }

        [Description("With --load-model: seed for random weights, LoRA init and input tokens (default 0)")]
        [CommandOption(SharedOptions.Seed)]
        public long Seed { get; init; }

        [Description("With --load-model: tokens of the sequence used for the gradient-flow backward (default 4, so that some experts go unselected)")]
        [CommandOption("--grad-tokens <N>")]
        public int GradTokens { get; init; } = 4;

        [Description("With --load-model: training steps to run and measure (speed, loss, peak device memory against Core's prediction): lora, cb or lora,cb (default none)")]
        [CommandOption("--measure-steps <MODES>")]
        public string? MeasureSteps { get; init; }

        [Description("With --measure-steps: tokens per sequence of every step batch (default 1024)")]
        [CommandOption("--step-tokens <N>")]
        public int StepTokens { get; init; } = 1024;

        [Description("With --measure-steps: sequences per batch; a cb step runs a retain and a CB batch of this size (default 1)")]
        [CommandOption("--step-batch <N>")]
        public int StepBatch { get; init; } = 1;

        [Description("With --measure-steps: timed steps after one warm-up step; the median is reported (default 3)")]
        [CommandOption("--step-repeats <N>")]
        public int StepRepeats { get; init; } = 3;

        /// <summary>--measure-steps as distinct modes in measuring order; empty when not asked.</summary>
        public IReadOnlyList<string> ParsedMeasureSteps
        {
            get
            {
                if (MeasureSteps is null) return [];
                var words = MeasureSteps.Split(',', StringSplitOptions.TrimEntries).Select(w => w.ToLowerInvariant()).ToList();
                foreach (var w in words)
                    if (!StepModes.Contains(w))
                        throw new UserInputException($"--measure-steps '{MeasureSteps}': '{w}' is not a step; use lora, cb or lora,cb");
                return StepModes.Where(words.Contains).ToList();
            }
        }
    }

    public override int Execute(CommandContext context, Settings settings, CancellationToken cancellationToken)
    {
        StartupTrace.Mark("report: options parsed");
        var format = settings.Format;
        var lora = settings.BuildLoraConfig();
        var training = settings.BuildTrainingSetup();
        var loaded = ModelLoader.LoadChecked(settings.Model, settings.Layout, settings.Revision, settings.CheckpointHeaders);
        var (spec, resolved) = (loaded.Spec, loaded.Resolved);
        StartupTrace.Mark("report: model loaded");
        var report = LoraReport.Build(spec, lora, settings.ParsedPeftVersion, new ReportOptions
        {
            ModelId = resolved.Id,
            Source = resolved.Origin.ToString().ToLowerInvariant(),
            SourceNote = resolved.Notes.Count > 0 ? string.Join("; ", resolved.Notes) : null,
            SourceSummary = ModelLoader.Summary(resolved),
            BatchSize = Positive(settings.BatchSize, "--batch-size"),
            SeqLength = Positive(settings.SeqLength, "--seq-length"),
            DType = settings.DType,
            TargetLayers = settings.ParsedTargetLayers,
            Training = training,
        });
        StartupTrace.Mark("report: analysis built");
        if (settings.LoadModel) return LoadModelMeasurement.Run(report, resolved, settings, format);
        var checkpoint = CheckpointJson.ToJson(loaded);
        Write(ReportDocumentBuilder.Build(report, loaded), report, format, settings.Output, json => json["checkpoint"] = checkpoint);
        StartupTrace.Mark("report: written");
        return ExitCodes.Ok;
    }

    /// <summary>Renders the one document in the chosen view; <paramref name="addJson"/> adds what only JSON carries raw.</summary>
    internal static void Write(ReportDocument document, LoraReport report, OutputFormat format, string? output, Action<JsonObject> addJson)
    {
        switch (format)
        {
            case OutputFormat.Json:
                var json = report.ToJson();
                addJson(json);
                Output.Json(JsonView.Render(json, document), output);
                break;
            case OutputFormat.Markdown: Output.Text(MarkdownView.Render(document), output); break;
            case OutputFormat.Html: Output.Text(HtmlView.Render(document), output); break;
            default: Output.Renderables(TextView.Render(document), output); break;
        }
    }

    internal static int Positive(int value, string option) =>
        value > 0 ? value : throw new UserInputException($"{option} must be a positive integer, got {value}");
}
