using System.ComponentModel;
using MoeLora.Core.Catalog;
using MoeLora.Core.Modules;
using Spectre.Console.Cli;
using MoeLora.Core;
using MoeLora.Cli.Infrastructure;

namespace MoeLora.Cli.Commands;

/// <summary>Options shared by every command that analyses one model.</summary>
public class ModelSettings : CommandSettings
{
    [CommandArgument(0, "[MODEL]")]
    [Description("Hub id (catalog, HF cache or Hub), a folder with config.json, or a config.json path. Default: " + ModelCatalog.DefaultModelId)]
    public string Model { get; init; } = ModelCatalog.DefaultModelId;

    [CommandOption("--layout <LAYOUT>")]
    [Description("Module layout: v5 (transformers 5, fused experts; default) or v4 (transformers 4.57, per-expert modules)")]
    public string Layout { get; init; } = "v5";

    [CommandOption("--revision <REV>")]
    [Description("Hub branch, tag or commit (default main)")]
    public string Revision { get; init; } = "main";

    [CommandOption("--format <FORMAT>")]
    [Description("Output format: text, json or markdown (md); report also html (default text)")]
    public string Format { get; init; } = "text";

    [CommandOption("-o|--output <FILE>")]
    [Description("Write the result here instead of the terminal (atomically; for plan, the folder for its launch files)")]
    public string? Output { get; init; }

    public Layout ParsedLayout => LayoutNames.Parse(Layout);

    /// <summary>The --format values this command writes.</summary>
    protected virtual string[] Formats => ["text", "json", "markdown", "md"];

    public override Spectre.Console.ValidationResult Validate() => OptionChecks.First(
        OptionChecks.OneOf(Format, "--format", true, Formats),
        OptionChecks.OneOf(Layout, "--layout", "v5", "v4"));

    public string ParsedFormat => Format.ToLowerInvariant() is "text" or "json" or "markdown" or "md"
        ? Format.ToLowerInvariant().Replace("md", "markdown", StringComparison.Ordinal)
        : throw new UsageException($"unknown format '{Format}': use text, json or markdown");
}
