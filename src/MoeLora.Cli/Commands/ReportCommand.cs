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
            : OptionChecks.First(OptionChecks.AtLeast(GradTokens, 1, "--grad-tokens"));

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
