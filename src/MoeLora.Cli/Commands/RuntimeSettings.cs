using System.ComponentModel;
using MoeLora.Torch.Lora;
using System.Text.Json;
using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
using MoeLora.Sources;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Text;
using Spectre.Console.Cli;
using TorchSharp;
using static TorchSharp.torch;
using MoeLora.Core;
using MoeLora.Cli.Options;

namespace MoeLora.Cli.Commands;

/// <summary>Options of the commands that run the model (hidden-states, routers).</summary>
public class RuntimeSettings : ModelSettings
{
    [CommandOption(SharedOptions.Device)]
    [Description(SharedOptions.DeviceHelp)]
    public DeviceName Device { get; init; } = DeviceName.Cpu;

    [CommandOption("--init <INIT>")]
    [Description("'random': build from config.json with seeded random weights instead of loading the checkpoint (default: load the checkpoint)")]
    public string? Init { get; init; }

    [CommandOption(SharedOptions.Seed)]
    [Description("Seed for --init random (default 0)")]
    public long Seed { get; init; }

    [CommandOption(SharedOptions.ModelDType)]
    [Description("Dtype the model runs in: fp32, bf16 or fp16 (default fp32)")]
    [TypeConverter(typeof(DTypeConverter))]
    public Core.Analysis.DType ModelDType { get; init; } = Core.Analysis.DType.Float32;

    [CommandOption("--adapter <DIR>")]
    [Description("A PEFT adapter folder (adapter_config.json + adapter_model.safetensors) to apply, e.g. one moelora train wrote (default: none)")]
    public string? Adapter { get; init; }

    [CommandOption("--max-length <N>")]
    [Description("Truncate tokenised prompts to N tokens (default 512)")]
    public int MaxLength { get; init; } = 512;

    public override Spectre.Console.ValidationResult Validate() => base.Validate() is { Successful: false } failed ? failed : OptionChecks.First(
        OptionChecks.AtLeast(MaxLength, 1, "--max-length"),
        Init is not null && !Init.Equals("random", StringComparison.OrdinalIgnoreCase) ? $"--init '{Init}': only 'random' is supported (omit --init to load the checkpoint)" : null);

    internal static ScalarType ScalarTypeOf(Core.Analysis.DType dtype) => dtype switch
    {
        Core.Analysis.DType.Float32 => ScalarType.Float32,
        Core.Analysis.DType.BFloat16 => ScalarType.BFloat16,
        _ => ScalarType.Float16,
    };

    /// <summary>Resolves MODEL, checks the checkpoint headers, then builds the model (cheap checks first).</summary>
    internal (CausalLm Model, ResolvedModel Resolved) LoadModel()
    {
        if (Init is not null && !Init.Equals("random", StringComparison.OrdinalIgnoreCase))
            throw new UserInputException($"--init '{Init}': only 'random' is supported (omit --init to load the checkpoint)");
        var dtype = ScalarTypeOf(ModelDType);
        var (spec, resolved) = ModelLoader.Load(Model, Layout, Revision);
        if (spec.Layout != Core.Modules.Layout.V5) throw new UserInputException("the runtime builds transformers-5 modules; use --layout v5");
        spec.RequireRuntime();
        string? dir = null;
        if (Init is null)
        {
            dir = resolved.Directory ?? throw new FileNotFoundException(
                $"no checkpoint for {resolved.Id}: its config came from the {resolved.OriginName} (no weights); pass a local folder or a cached model, or use --init random");
            CheckpointLoader.Precheck(dir, spec);
        }
        var dev = RuntimeDevice.Select(Device.Text);
        var model = dir is null
            ? TorchModelFactory.Random(resolved.ConfigJson, Seed, dtype, dev)
            : RuntimeDevice.Load($"loading {resolved.Id}", p => TorchModelFactory.Load(resolved.ConfigJson, dir, dtype, dev, p));
        if (Adapter is not null)
        {
            if (!File.Exists(Path.Combine(Adapter, "adapter_config.json")))
                throw new FileNotFoundException($"--adapter {Adapter}: no adapter_config.json there");
            LoraInjector.LoadPeftAdapter(model, Adapter);
        }
        model.Eval();
        return (model, resolved);
    }

    /// <summary>
    /// Reads a JSONL file: each line an object with <c>input_ids</c> (token ids), or <c>prompt</c>/<c>text</c> (tokenised
    /// with the model's tokenizer.json), or a bare JSON string.
    /// </summary>
    internal List<long[]> ReadJsonl(string path, string? modelDir, string option)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{option} {path} does not exist");
        HfTokenizer? tokenizer = null;
        var result = new List<long[]>();
        int lineNo = 0;
        foreach (var line in File.ReadLines(path))
        {
            lineNo++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            JsonNode? node;
            try { node = JsonNode.Parse(line); }
            catch (JsonException e) { throw new UserInputException($"{path}:{lineNo}: not valid JSON: {Core.Util.UserJson.Describe(e)}"); }
            long[] ids;
            if (node is JsonObject o && o["input_ids"] is JsonArray a) ids = a.Select(x => x!.GetValue<long>()).ToArray();
            else
            {
                var text = node switch
                {
                    JsonObject ob => (ob["prompt"] ?? ob["text"])?.GetValue<string>(),
                    JsonValue v when v.TryGetValue<string>(out var s) => s,
                    _ => null,
                } ?? throw new UserInputException($"{path}:{lineNo}: expected {{\"prompt\": ...}}, {{\"text\": ...}}, {{\"input_ids\": [...]}} or a string");
                tokenizer ??= HfTokenizer.Load(modelDir);
                ids = tokenizer.EncodeToLongs(text);
            }
            if (ids.Length == 0) throw new UserInputException($"{path}:{lineNo}: empty input");
            result.Add(ids.Length > MaxLength ? ids[..MaxLength] : ids);
        }
        if (result.Count == 0) throw new UserInputException($"{path}: no inputs");
        return result;
    }

    /// <summary>Right-padded batch (pad id 0) with its attention mask.</summary>
    internal static (Tensor Ids, Tensor Mask) Batch(IReadOnlyList<long[]> seqs, long vocab)
    {
        int s = seqs.Max(x => x.Length);
        var ids = new long[seqs.Count * s];
        var mask = new long[seqs.Count * s];
        for (int i = 0; i < seqs.Count; i++)
            for (int j = 0; j < seqs[i].Length; j++)
            {
                if (seqs[i][j] < 0 || seqs[i][j] >= vocab) throw new UserInputException($"token id {seqs[i][j]} is outside the vocabulary (0..{vocab - 1})");
                ids[i * s + j] = seqs[i][j]; mask[i * s + j] = 1;
            }
        return (tensor(ids, [seqs.Count, s]), tensor(mask, [seqs.Count, s]));
    }
}
