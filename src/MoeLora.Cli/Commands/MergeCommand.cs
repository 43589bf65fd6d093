using System.ComponentModel;
using MoeLora.Cli.Infrastructure;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Training;
using Spectre.Console;
using Spectre.Console.Cli;
using ScalarType = TorchSharp.torch.ScalarType;
using Tensor = TorchSharp.torch.Tensor;
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
        [Description("PEFT adapter folder (adapter_config.json + adapter_model.safetensors), e.g. a moelora train --output (required)")]
        public string? Adapter { get; init; }

        [CommandOption("-o|--output <DIR>")]
        [Description("New or empty folder for the merged checkpoint (written to a temporary sibling, then renamed into place) (required)")]
        public string? Output { get; init; }

        public override ValidationResult Validate() => OptionChecks.First(
            Adapter is null ? "--adapter DIR is required (a PEFT adapter folder)" : null,
            Output is null ? "--output DIR is required (a new or empty folder)" : null);
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        if (!File.Exists(Path.Combine(s.Model, "config.json"))) throw new UserInputException($"{s.Model}: no config.json (merge needs a local checkpoint folder).");
        if (s.Adapter is null || !File.Exists(Path.Combine(s.Adapter, "adapter_config.json")))
            throw new UserInputException("--adapter DIR with adapter_config.json is required.");
        if (File.Exists(Path.Combine(s.Adapter, Checkpoints.RouterFile)))
            throw new UserInputException($"{s.Adapter} holds {Checkpoints.RouterFile} (--train-router): merging trained routers is not supported yet.");
        if (s.Output is null) throw new UsageException("--output DIR is required.");
        // Never destroy what the user has: the merged checkpoint replaces the folder, so only a new or empty one will do.
        if (File.Exists(s.Output)) throw new UserInputException($"--output {s.Output} is a file; merge writes a checkpoint folder.");
        if (Directory.Exists(s.Output) && Directory.EnumerateFileSystemEntries(s.Output).ToList() is { Count: > 0 } present)
            throw new UserInputException($"--output {s.Output} is not empty ({string.Join(", ", present.Select(Path.GetFileName).Order(StringComparer.Ordinal).Take(3))}{(present.Count > 3 ? $" and {present.Count - 3} more" : "")}); merge writes into a new or empty folder.");
        TorchRuntime.EnsureInitialized();
        using var model = TorchModelFactory.Load(s.Model, ScalarType.Float32);
        var adapter = LoraInjector.LoadPeftAdapter(model, s.Adapter);
        // Merges that silently drop the expert deltas are a known failure (unsloth-zoo #647, mergekit #692): refuse to
        // write when an adapted tensor would come out unchanged, and prove afterwards what was written.
        var names = new Dictionary<Tensor, string>(ReferenceEqualityComparer.Instance);
        foreach (var (name, value) in model.StateDict()) names.TryAdd(value, name.Replace(".base_layer", "", StringComparison.Ordinal));
        var wrappers = model.NamedModules().Select(m => m.Module).OfType<LoraWrapper>().Where(w => w.Enabled).ToList();
        var expected = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        var original = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        using (TorchSharp.torch.no_grad())
            foreach (var w in wrappers)
            {
                string name = names[w.Target];
                original.TryAdd(name, w.Target.detach());
                var current = expected.TryGetValue(name, out var t) ? t : w.Target.detach();
                expected[name] = w.Merge(current);
            }
        var unchanged = expected.Where(kv => kv.Value.equal(original[kv.Key]).all().item<bool>()).Select(kv => kv.Key).ToList();
        if (unchanged.Count > 0)
            throw new UserInputException($"merging would leave {unchanged.Count} adapted tensor(s) unchanged (first: {unchanged[0]}): the adapter's ΔW is zero or below the weights' precision; nothing written.");
        LoraMerge.SaveHubCheckpoint(model, s.Model, s.Output);
        double worst = 0; string worstAt = "";
        using (var written = TorchModelFactory.Load(s.Output, ScalarType.Float32))
        using (TorchSharp.torch.no_grad())
        {
            var state = written.StateDict().ToDictionary(kv => kv.Name, kv => kv.Value, StringComparer.Ordinal);
            foreach (var (name, want) in expected)
            {
                var diff = (state[name] - want).abs();
                // Per expert for 3-D expert tensors: the largest |W_merged − (W + ΔW)| of each expert.
                var perExpert = diff.dim() == 3 ? diff.amax([1, 2]) : diff.max().reshape(1);
                var values = perExpert.to(ScalarType.Float64).data<double>().ToArray();
                for (int e = 0; e < values.Length; e++)
                    if (values[e] > worst || worstAt.Length == 0) { worst = values[e]; worstAt = diff.dim() == 3 ? $"{name}[expert {e}]" : name; }
            }
        }
        Consoles.Out.MarkupLine($"[green]merged[/] {adapter.Wrappers.Count} adapters into {Markup.Escape(s.Output)} (Hub layout of {Markup.Escape(s.Model)})");
        Consoles.Out.MarkupLine($"checked: {expected.Count} adapted tensors re-read from {Markup.Escape(s.Output)}; largest per-expert |W_merged − (W + ΔW)| = {worst.ToString("G3", System.Globalization.CultureInfo.InvariantCulture)} ({Markup.Escape(worstAt)})");
        return ExitCodes.Ok;
    }
}
