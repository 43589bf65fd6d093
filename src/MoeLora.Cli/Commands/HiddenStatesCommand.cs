using System.ComponentModel;
using System.Text.Json.Nodes;
using MoeLora.Torch.IO;
using Spectre.Console.Cli;
using TorchSharp;
using static TorchSharp.torch;
using MoeLora.Core;

namespace MoeLora.Cli.Commands;

/// <summary>
/// <c>moelora hidden-states MODEL (--prompts F.jsonl | --inputs F.safetensors) --layers all|N... -o OUT.safetensors</c>:
/// runs the model and writes <c>hidden_states [layers, batch, seq, hidden]</c> (HF indexing, 0 = embeddings),
/// <c>logits</c>, <c>input_ids</c> and <c>attention_mask</c>. States that differ in shape (hyper-connection streams
/// before the normed output) are written one key per state, <c>hidden_states.{index}</c>.
/// </summary>
public sealed class HiddenStatesCommand : Command<HiddenStatesCommand.Settings>
{
    public sealed class Settings : RuntimeSettings
    {
        // -o is the safetensors file: the printed summary's format never comes from its name.
        protected override string? ResultFile => null;

        [CommandOption("--prompts <FILE>")]
        [Description("JSONL: {\"prompt\": ...}/{\"text\": ...} (tokenised with the model's tokenizer.json) or {\"input_ids\": [[...]]} per line (one of --prompts or --inputs is required)")]
        public string? Prompts { get; init; }

        [CommandOption("--inputs <FILE>")]
        [Description("safetensors with input_ids [[B,S]] and attention_mask [[B,S]] (as the fixtures' reference files) (one of --prompts or --inputs is required)")]
        public string? Inputs { get; init; }

        [CommandOption("--layers <LAYERS>")]
        [Description("'all' (default) or hidden_states indices (0 = embeddings, L = final normed output)")]
        public string[]? Layers { get; init; }

        [CommandOption("--dtype <DTYPE>")]
        [Description("Dtype of the written tensors: fp32, bf16 or fp16 (default fp32)")]
        [TypeConverter(typeof(Options.DTypeConverter))]
        public Core.Analysis.DType DType { get; init; } = Core.Analysis.DType.Float32;
    }

    public override int Execute(CommandContext context, Settings s, CancellationToken cancellationToken)
    {
        if ((s.Prompts is null) == (s.Inputs is null)) throw new UserInputException("give exactly one of --prompts FILE.jsonl or --inputs FILE.safetensors");
        if (s.Output is null) throw new UserInputException("--output OUT.safetensors is required");
        var outDir = Path.GetDirectoryName(Path.GetFullPath(s.Output))!;
        if (!Directory.Exists(outDir)) throw new IOException($"cannot write {s.Output}: folder {outDir} does not exist");
        var outType = RuntimeSettings.ScalarTypeOf(s.DType);
        Tensor? ids = null, mask = null;
        if (s.Inputs is not null && !File.Exists(s.Inputs)) throw new FileNotFoundException($"--inputs {s.Inputs} does not exist");
        // The model first: it selects the device before anything touches TorchSharp (a CUDA request decides which
        // libtorch loads), after the cheap checks of the model and its checkpoint headers.
        var (model, resolved) = s.LoadModel();
        if (s.Inputs is not null) (ids, mask) = ReadInputs(s.Inputs);
        using var _ = model;
        using var scope = NewDisposeScope();
        if (ids is null) (ids, mask) = RuntimeSettings.Batch(s.ReadJsonl(s.Prompts!, resolved.Directory, "--prompts"), model.VocabSize);
        if (ids.max().item<long>() >= model.VocabSize || ids.min().item<long>() < 0)
            throw new UserInputException($"input_ids contain ids outside the vocabulary (0..{model.VocabSize - 1})");
        int states = model.NumLayers + 1;
        var layers = ParseLayers(s.Layers, states);
        using var output = no_grad_forward(model, ids, mask!);
        var selected = layers.Select(i => output.HiddenStates[i]).ToList();
        // States of different shapes (hyper-connection streams [B, S, n, H] before the normed [B, S, H]) cannot stack:
        // one key per state then, hidden_states.{index}, as transformers' references for such models store them.
        bool stacked = selected.All(t => t.shape.SequenceEqual(selected[0].shape));
        var tensors = stacked
            ? new List<KeyValuePair<string, Tensor>> { new("hidden_states", stack(selected.ToArray(), 0).to(outType).contiguous()) }
            : layers.Select((l, k) => new KeyValuePair<string, Tensor>(
                "hidden_states." + l.ToString(System.Globalization.CultureInfo.InvariantCulture), selected[k].to(outType).contiguous())).ToList();
        tensors.AddRange(
        [
            new("logits", output.Logits.to(outType).contiguous()),
            new("input_ids", ids.contiguous()),
            new("attention_mask", mask!.to(ScalarType.Int64).contiguous()),
        ]);
        var hsShape = stacked ? tensors[0].Value.shape : null;
        var hsText = hsShape is not null ? $"[{string.Join(",", hsShape)}]"
            : string.Join(" ", layers.Select((l, k) => $"{l}:[{string.Join(",", selected[k].shape)}]"));
        Infrastructure.AtomicFile.Write(s.Output, temp => Safetensors.Save(temp, tensors, new Dictionary<string, string>
        {
            ["format"] = "pt",
            ["layers"] = string.Join(",", layers),
            ["model"] = resolved.Id,
        }));
        var dtypeName = Core.Analysis.DTypes.Name(s.DType);
        var line = $"wrote {s.Output}: hidden_states {hsText} ({dtypeName}), logits [{string.Join(",", output.Logits.shape)}], layers {string.Join(",", layers)}";
        // -o is the safetensors file; the printed result is this summary, in --format.
        Output.Result(s.Format, null, () => new JsonObject
        {
            ["schema"] = "moelora.hidden_states/1",
            ["model"] = resolved.Id,
            ["output"] = s.Output,
            ["hidden_states"] = hsShape is not null ? Shape(hsShape)
                : new JsonObject(layers.Select((l, k) => KeyValuePair.Create(l.ToString(System.Globalization.CultureInfo.InvariantCulture), (JsonNode?)Shape(selected[k].shape)))),
            ["logits"] = Shape(output.Logits.shape),
            ["dtype"] = dtypeName,
            ["layers"] = new JsonArray(layers.Select(l => (JsonNode)JsonValue.Create(l)).ToArray()),
        }, () => [new Spectre.Console.Text(line + "\n")], () =>
            Rendering.MarkdownTable.Render(["tensor", "shape", "dtype"],
            [
                ["hidden_states", hsShape is not null ? $"[{string.Join(", ", hsShape)}]" : hsText, dtypeName],
                ["logits", $"[{string.Join(", ", output.Logits.shape)}]", dtypeName],
            ]) + $"\nWritten to `{s.Output}` (layers {string.Join(",", layers)}).\n");
        return 0;
    }

    static JsonArray Shape(long[] shape) => new(shape.Select(d => (JsonNode)JsonValue.Create(d)).ToArray());

    static Torch.Models.CausalLmOutput no_grad_forward(Torch.Models.CausalLm model, Tensor ids, Tensor mask)
    {
        using (no_grad()) return model.Forward(ids, mask, outputHiddenStates: true);
    }

    internal static (Tensor Ids, Tensor Mask) ReadInputs(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"--inputs {path} does not exist");
        Torch.Runtime.TorchRuntime.EnsureInitialized();
        var t = Safetensors.Load(path, k => k is "input_ids" or "attention_mask");
        if (!t.TryGetValue("input_ids", out var ids)) throw new UserInputException($"--inputs {path} has no input_ids tensor");
        if (ids.dim() != 2) throw new UserInputException($"--inputs {path}: input_ids must be [batch, seq], got [{string.Join(",", ids.shape)}]");
        if (ids.dtype is not (ScalarType.Int64 or ScalarType.Int32)) throw new UserInputException($"--inputs {path}: input_ids must be I64 or I32, got {ids.dtype}");
        var mask = t.TryGetValue("attention_mask", out var m) ? m : ones_like(ids);
        if (!mask.shape.SequenceEqual(ids.shape))
            throw new UserInputException($"--inputs {path}: attention_mask [{string.Join(",", mask.shape)}] does not match input_ids [{string.Join(",", ids.shape)}]");
        return (ids.to(ScalarType.Int64), mask.to(ScalarType.Int64));
    }

    internal static List<int> ParseLayers(string[]? values, int states)
    {
        if (values is null || (values.Length == 1 && values[0].Equals("all", StringComparison.OrdinalIgnoreCase)))
            return Enumerable.Range(0, states).ToList();
        var layers = LoraSettings.ParseInts(values, "--layers");
        foreach (var l in layers)
            if (l < 0 || l >= states) throw new UserInputException($"--layers {l} does not exist: this model returns hidden_states[0..{states - 1}]");
        return layers;
    }
}
