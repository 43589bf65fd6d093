using System.ComponentModel;
using MoeLora.Cli.Infrastructure;
using MoeLora.Core.Analysis;
using MoeLora.Sources;
using MoeLora.Sources.Progress;
using Spectre.Console;
using Spectre.Console.Cli;
using MoeLora.Core;

namespace MoeLora.Cli.Commands;

/// <summary>
/// <c>moelora download MODEL [--revision REV] [--include PATTERNS]</c>: fetches config, tokenizer files and
/// safetensors weights into the HF cache exactly as huggingface_hub stores them, so every other command can then
/// take the Hub id (offline too).
/// </summary>
public sealed class DownloadCommand : AsyncCommand<DownloadCommand.Settings>
{
    public sealed class Settings : CommandSettings
    {
        [CommandArgument(0, "<MODEL>")]
        [Description("Hub id (org/name)")]
        public string Model { get; init; } = "";

        [CommandOption("--revision <REV>")]
        [Description("Hub branch, tag or commit (default main)")]
        public string Revision { get; init; } = "main";

        [CommandOption("--include <PATTERNS>")]
        [Description("Comma-separated globs (e.g. \"*.json\" or \"model-0000[[1-2]]-*\") that narrow the standard files (config, tokenizer, safetensors weights); names without a wildcard are fetched as well, e.g. README.md (default: the standard files only)")]
        public string? Include { get; init; }
    }

    public override async Task<int> ExecuteAsync(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        string[]? include = s.Include?.Split(',', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        if (s.Include is not null && include!.Length == 0) throw new UserInputException("--include needs at least one pattern, e.g. \"*.json\"");
        SourceSettings sources = ModelLoader.Settings();
        IAnsiConsole console = Consoles.Out;
        // Live bars only on a terminal; piped output gets one plain line per file as it is settled.
        bool live = !Console.IsOutputRedirected && console.Profile.Capabilities.Ansi && console.Profile.Capabilities.Interactive;
        var options = new DownloadOptions
        {
            Revision = s.Revision,
            Include = include,
            OnFile = live ? null : file => Write(console, Line(file)),
        };

        DownloadResult result;
        if (live)
        {
            result = await console.Progress()
                .AutoClear(false)
                .Columns(new TaskDescriptionColumn(), new ProgressBarColumn(), new PercentageColumn(), new DownloadedColumn(),
                    new TransferSpeedColumn(), new RemainingTimeColumn())
                .StartAsync(async ctx =>
                {
                    using var resolver = new ModelResolver(sources with { Progress = new SpectreDownloadProgress(ctx) });
                    return await resolver.DownloadAsync(s.Model, options, cancellationToken);
                });
            foreach (DownloadedFile file in result.Files) Write(console, Line(file));
        }
        else
        {
            using var resolver = new ModelResolver(sources);
            result = await resolver.DownloadAsync(s.Model, options, cancellationToken);
        }

        var present = result.Present.ToList();
        Write(console, $"{present.Count} files, {Units.Bytes(result.TotalBytes)} ({Units.Bytes(result.BytesDownloaded)} downloaded now) "
            + $"of {result.Id} at commit {result.Commit}" + (result.Revision == result.Commit ? "" : $" ({result.Revision})"));
        Write(console, $"Snapshot: {result.SnapshotFolder}");
        string revision = result.Revision == "main" ? "" : $" --revision {result.Revision}";
        Write(console, result.Weights is null
            ? $"No weights were fetched. Next: moelora report {result.Id}{revision}"
            : $"Next: moelora report {result.Id}{revision} --load-model");
        return ExitCodes.Ok;
    }

    // Unwrapped, so paths and the next command stay whole for copying.
    private static void Write(IAnsiConsole console, string line) => console.Profile.Out.Writer.WriteLine(line);

    private static string Line(DownloadedFile file) => file.Status switch
    {
        DownloadStatus.Downloaded => $"  downloaded  {file.Path} ({Units.Bytes(file.Size)})",
        DownloadStatus.Cached => $"  in cache    {file.Path} ({Units.Bytes(file.Size)})",
        DownloadStatus.Linked => $"  linked      {file.Path} ({Units.Bytes(file.Size)}, blob already in the cache)",
        _ => $"  absent      {file.Path} (optional, not in this model)",
    };
}
