using System.ComponentModel;
using System.Globalization;
using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Options;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Training;
using Spectre.Console;
using Spectre.Console.Cli;
using TorchSharp;
using ScalarType = TorchSharp.torch.ScalarType;
using DeviceType = TorchSharp.DeviceType;
using MoeLora.Core;

namespace MoeLora.Cli.Commands;

public sealed class EvalSettings : CbCommonSettings
{
    [CommandOption("--adapter <DIR>")] [Description("PEFT adapter folder (adapter_config.json + adapter_model.safetensors); without it only the base row (default: none)")]
    public string? Adapter { get; init; }
    [CommandOption("--cb-data <FILE>")] [Description("Held-out circuit-breaker JSONL (default for tiny: the tool's embedded copy of data/tiny/cb_eval.jsonl)")]
    public string? CbData { get; init; }
    [CommandOption("--retain-data <FILE>")] [Description("Held-out retain JSONL (default for tiny: the tool's embedded copy of data/tiny/retain_eval.jsonl)")]
    public string? RetainData { get; init; }
    // The same --format and -o as every command that prints a result (ResultSettings); eval's settings already
    // derive from the train/eval base, so they are declared here with the shared spellings and parser.
    [CommandOption(SharedOptions.Format)] [Description("Output format: text, json or markdown (md) (default text)")]
    [TypeConverter(typeof(OutputFormatConverter))]
    public OutputFormat Format { get; init; } = OutputFormat.Text;
    [CommandOption(SharedOptions.Output)] [Description("Write the metrics here, atomically, instead of the terminal (default: the terminal)")]
    public string? Output { get; init; }

    public override Spectre.Console.ValidationResult Validate() => base.Validate() is { Successful: false } failed ? failed
        : OptionChecks.First(Format == OutputFormat.Html ? $"--format 'html': {OutputFormats.Accepted([OutputFormat.Text, OutputFormat.Json, OutputFormat.Markdown])}" : null);
}

/// <summary><c>moelora eval</c>: rerouting (CB cosine) and retain (distance) metrics for the base model and with an adapter.</summary>
public sealed class EvalCommand : Command<EvalSettings>
{
    public override int Execute(CommandContext context, EvalSettings s, CancellationToken cancellationToken)
    {
        var preset = s.ResolvePreset();
        var modelDir = s.ModelDir(preset);
        var targets = s.TargetLayers(preset);
        int layers = CbModels.TruncatedLayers(targets, CbModels.ModelLayers(modelDir), s.FullLayers);
        var lengths = s.Lengths(preset);
        var device = RuntimeDevice.Select(s.Device.Text);
        using var model = CbModels.Load(modelDir, layers, s.ModelScalarType(), device);
        var loader = new CbDataLoader(CbModels.Tokenizer(modelDir), Torch.Training.ChatTemplate.Get(s.TemplateName(modelDir)), lengths);
        string Data(string? given, string file, string flag) =>
            given ?? (preset.Name == "tiny" ? TrainCommand.FindTinyData(file) : throw new UserInputException($"{flag} FILE is required."));
        var cb = loader.LoadCircuitBreaker(Data(s.CbData, "cb_eval.jsonl", "--cb-data"));
        var retain = loader.LoadRetain(Data(s.RetainData, "retain_eval.jsonl", "--retain-data"));
        int batch = s.BatchSize ?? Math.Min(preset.BatchSize, 8);
        var rows = new List<(string Name, CbEvalResult R)> { ("base", CbEvaluator.Evaluate(model, cb, retain, targets, batch, withAdapter: false)) };
        if (s.Adapter is not null)
        {
            if (!Directory.Exists(s.Adapter)) throw new UserInputException($"--adapter {s.Adapter}: not a folder.");
            LoraInjector.LoadPeftAdapter(model, s.Adapter);
            if (File.Exists(Path.Combine(s.Adapter, Checkpoints.RouterFile)))
                throw new UserInputException($"{s.Adapter} holds router.safetensors (--train-router): eval of trained routers is not supported yet.");
            rows.Add(("adapter", CbEvaluator.Evaluate(model, cb, retain, targets, batch, withAdapter: true)));
        }
        string[] headers = ["model", "CB cosine (targets " + string.Join(",", targets) + ")", "per layer", "RR loss", "retain ‖Δh‖", "retain ‖Δh‖/‖h‖"];
        var cells = rows.Select(x => (IReadOnlyList<string>)[x.Name, F(x.R.CbCosine), string.Join(" ", x.R.CbCosinePerLayer.Select(F)), F(x.R.RerouteLoss), F(x.R.RetainDistance), F(x.R.RetainRelativeDistance)]).ToList();
        var note = $"{cb.Count} held-out circuit-breaker and {retain.Count} retain examples; cosine 1 = unchanged, ≤ 0 = rerouted.";
        Output.Result(s.Format, s.Output, () =>
        {
            var o = new JsonObject { ["target_layers"] = new JsonArray(targets.Select(t => (JsonNode)t).ToArray()) };
            foreach (var (n, r) in rows)
                o[n] = new JsonObject
                {
                    ["cb_cosine"] = r.CbCosine, ["cb_cosine_per_layer"] = new JsonArray(r.CbCosinePerLayer.Select(x => (JsonNode)x).ToArray()),
                    ["rr_loss"] = r.RerouteLoss, ["retain_distance"] = r.RetainDistance, ["retain_relative_distance"] = r.RetainRelativeDistance,
                    ["cb_examples"] = r.CbExamples, ["retain_examples"] = r.RetainExamples,
                };
            return o;
        }, () =>
        {
            return [Rendering.FitTable.Plain(headers, cells, TableBorder.Square), new Markup($"[grey]{Markup.Escape(note)}[/]\n")];
        }, () => Rendering.MarkdownTable.Render(headers, cells) + "\n" + note + "\n");
        return ExitCodes.Ok;
    }

    static string F(double x) => x.ToString("F4", CultureInfo.InvariantCulture);
}
