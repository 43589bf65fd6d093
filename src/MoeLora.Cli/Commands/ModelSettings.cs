using System.ComponentModel;
using MoeLora.Cli.Options;
using MoeLora.Core.Catalog;
using MoeLora.Core.Modules;
using Spectre.Console.Cli;

namespace MoeLora.Cli.Commands;

/// <summary>Options shared by every command that analyses one model.</summary>
public class ModelSettings : ResultSettings
{
    [CommandArgument(0, "[MODEL]")]
    [Description("Hub id (catalog, HF cache or Hub), a folder with config.json, or a config.json path. Default: " + ModelCatalog.DefaultModelId)]
    public string Model { get; init; } = ModelCatalog.DefaultModelId;

    [CommandOption("--layout <LAYOUT>")]
    [Description("Module layout: v5 (transformers 5, fused experts) or v4 (transformers 4.57, per-expert modules) (default v5)")]
    [TypeConverter(typeof(LayoutConverter))]
    public Layout Layout { get; init; } = Layout.V5;

    [CommandOption("--revision <REV>")]
    [Description("Hub branch, tag or commit (default main)")]
    public string Revision { get; init; } = "main";
}
