using System.ComponentModel;
using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Options;
using Spectre.Console.Cli;

namespace MoeLora.Cli.Commands;

/// <summary>
/// <c>--format</c> and <c>-o/--output</c>, for every command that prints a result: -o is always where the result goes
/// (a file, or the folder for commands whose result is several files) and --format what it is written as.
/// </summary>
public abstract class ResultSettings : CommandSettings
{
    [CommandOption(SharedOptions.Format)]
    [Description("Output format: text, json or markdown (md); html for report only (default: from the -o file's extension .json/.md/.html, else text)")]
    [TypeConverter(typeof(OutputFormatConverter))]
    public OutputFormat? RequestedFormat { get; init; }

    [CommandOption(SharedOptions.Output)]
    [Description("Write the result here, atomically, instead of the terminal (for plan: the folder for its launch files) (default: the terminal)")]
    public string? Output { get; init; }

    /// <summary>--format, else what the -o file's extension names (report.json is JSON), else text.</summary>
    public OutputFormat Format => RequestedFormat ?? FromExtension(ResultFile) ?? OutputFormat.Text;

    /// <summary>The file -o names for the printed result (null for commands whose -o is a folder or a data file).</summary>
    protected virtual string? ResultFile => Output;

    private OutputFormat? FromExtension(string? file)
    {
        OutputFormat? named = Path.GetExtension(file ?? "").ToLowerInvariant() switch
        {
            ".json" => OutputFormat.Json,
            ".md" => OutputFormat.Markdown,
            ".html" or ".htm" => OutputFormat.Html,
            _ => null,
        };
        return named is { } f && Formats.Contains(f) ? f : null;
    }

    /// <summary>The formats this command writes.</summary>
    protected virtual IReadOnlyCollection<OutputFormat> Formats => [OutputFormat.Text, OutputFormat.Json, OutputFormat.Markdown];

    public override Spectre.Console.ValidationResult Validate() => OptionChecks.First(
        RequestedFormat is not { } f || Formats.Contains(f) ? null : $"--format '{f.ToString().ToLowerInvariant()}': {OutputFormats.Accepted(Formats)}");
}
