using System.ComponentModel;
using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Plans;
using MoeLora.Cli.Rendering;
using MoeLora.Core.Analysis;
using System.Text.Json.Nodes;
using Spectre.Console;
using Spectre.Console.Rendering;
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

        [CommandOption("--overwrite")]
        [Description("Replace launch files of the same names already in the -o folder (default: refuse, as train does)")]
        public bool Overwrite { get; init; }

        // -o is a folder here: the printed summary's format never comes from its name.
        protected override string? ResultFile => null;
    }

    public override int Execute(CommandContext context, Settings settings, CancellationToken cancellationToken)
    {
        var dir = settings.OutputDir ?? settings.Output ?? throw new UsageException("plan needs -o DIR (the folder to write the launch files into)");
        // A folder may hold the user's own accelerate or DeepSpeed configs: never replace them silently.
        var existing = LaunchPlan.FileNames.Where(n => File.Exists(Path.Combine(dir, n))).ToList();
        if (existing.Count > 0 && !settings.Overwrite)
            throw new UserInputException($"--output {dir} already holds {string.Join(", ", existing)}; pass --overwrite to replace {(existing.Count == 1 ? "it" : "them")}, or choose another folder");
        var lora = settings.BuildLoraConfig();
        var training = settings.BuildTrainingSetup();
        var (spec, resolved) = ModelLoader.Load(settings.Model, settings.Layout, settings.Revision);
        var report = LoraReport.Build(spec, lora, settings.ParsedPeftVersion, new ReportOptions
        {
            ModelId = resolved.Id,
            Source = resolved.Origin.ToString().ToLowerInvariant(),
            BatchSize = ReportCommand.Positive(settings.BatchSize, "--batch-size"),
            SeqLength = ReportCommand.Positive(settings.SeqLength, "--seq-length"),
            DType = settings.DType,
            TargetLayers = settings.ParsedTargetLayers,
            Training = training,
        });
        // Launch files for a step that runs out of memory are no plan: write nothing and exit non-zero, naming
        // the re-estimated changes that do fit (or saying that none tried does).
        IReadOnlyList<string> paths = report.Training.Fits ? LaunchPlan.Write(report, dir) : [];
        Output.Result(settings.Format, null, () => Json(report, paths), () => Text(report, paths), () => Markdown(report, paths));
        if (!report.Training.Fits)
            throw new UserInputException($"{resolved.Id} does not fit this setup ({report.Training.Verdict}); no launch files were written");
        return ExitCodes.Ok;
    }

    private static JsonObject Json(LoraReport report, IReadOnlyList<string> paths)
    {
        var json = LaunchPlan.Summary(report);
        json["fits"] = report.Training.Fits;
        json["files"] = new JsonArray(paths.Select(p => (JsonNode)JsonValue.Create(p)).ToArray());
        return json;
    }

    private static IEnumerable<IRenderable> Text(LoraReport report, IReadOnlyList<string> paths) =>
        TrainingMemoryView.Render(report.Training).Concat(paths.Select(p => (IRenderable)new Markup($"wrote [bold]{Markup.Escape(p)}[/]\n")));

    private static string Markdown(LoraReport report, IReadOnlyList<string> paths) =>
        $"# MoeLora plan: {report.Options.ModelId}\n\n" + TrainingMemoryView.Markdown(report.Training)
        + (paths.Count == 0 ? "" : "\n## Files\n\n" + string.Concat(paths.Select(p => $"- `{p}`\n")));
}
