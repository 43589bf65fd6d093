using System.ComponentModel;
using MoeLora.Cli.Infrastructure;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Training;
using Spectre.Console;
using Spectre.Console.Cli;
using ScalarType = TorchSharp.torch.ScalarType;
using MoeLora.Core;

namespace MoeLora.Cli.Commands;

/// <summary>
/// <c>moelora merge MODEL --adapter DIR -o OUT</c>: PEFT's merge_and_unload. The checkpoint is loaded in float32, the
/// adapter applied, W+ΔW folded into each adapted weight, and OUT receives a checkpoint in MODEL's own Hub layout
/// (same shard files, index, keys and dtypes; config and tokenizer files copied), loadable without PEFT.
/// </summary>
public sealed class MergeCommand : Command<MergeCommand.Settings>
{
    public sealed class Settings : CommandSettings
    {
        [CommandArgument(0, "<MODEL>")]
        [Description("Local checkpoint folder (config.json + model*.safetensors)")]
        public string Model { get; init; } = "";

        [CommandOption("--adapter <DIR>")]
        [Description("PEFT adapter folder (adapter_config.json + adapter_model.safetensors), e.g. a moelora train --output")]
        public string? Adapter { get; init; }

        [CommandOption("-o|--output <DIR>")]
        [Description("Folder for the merged checkpoint (replaced atomically)")]
        public string? Output { get; init; }
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        if (!File.Exists(Path.Combine(s.Model, "config.json"))) throw new UserInputException($"{s.Model}: no config.json (merge needs a local checkpoint folder).");
        if (s.Adapter is null || !File.Exists(Path.Combine(s.Adapter, "adapter_config.json")))
            throw new UserInputException("--adapter DIR with adapter_config.json is required.");
        if (File.Exists(Path.Combine(s.Adapter, Checkpoints.RouterFile)))
            throw new UserInputException($"{s.Adapter} holds {Checkpoints.RouterFile} (--train-router): merging trained routers is not supported yet.");
        if (s.Output is null) throw new UserInputException("--output DIR is required.");
        TorchRuntime.EnsureInitialized();
        using var model = TorchModelFactory.Load(s.Model, ScalarType.Float32);
        var adapter = LoraInjector.LoadPeftAdapter(model, s.Adapter);
        LoraMerge.SaveHubCheckpoint(model, s.Model, s.Output);
        Consoles.Out.MarkupLine($"[green]merged[/] {adapter.Wrappers.Count} adapters into {Markup.Escape(s.Output)} (Hub layout of {Markup.Escape(s.Model)})");
        return ExitCodes.Ok;
    }
}
