using System.ComponentModel;
using System.Globalization;
using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
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
    [CommandOption("--adapter <DIR>")] [Description("PEFT adapter folder (adapter_config.json + adapter_model.safetensors); without it only the base row")]
    public string? Adapter { get; init; }
    [CommandOption("--cb-data <FILE>")] [Description("Held-out circuit-breaker JSONL (default for tiny: the tool's embedded copy of data/tiny/cb_eval.jsonl)")]
    public string? CbData { get; init; }
    [CommandOption("--retain-data <FILE>")] [Description("Held-out retain JSONL (default for tiny: the tool's embedded copy of data/tiny/retain_eval.jsonl)")]
    public string? RetainData { get; init; }
    [CommandOption("--format <FORMAT>")] [Description("text or json")]
    public string Format { get; init; } = "text";

    public override Spectre.Console.ValidationResult Validate() => base.Validate() is { Successful: false } failed ? failed
        : OptionChecks.First(OptionChecks.OneOf(Format, "--format", "text", "json"));
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
        if (s.Format is not ("text" or "json")) throw new UserInputException($"--format {s.Format}: use text or json.");
        var device = RuntimeDevice.Select(s.Device);
        using var model = CbModels.Load(modelDir, layers, s.Bf16 ? ScalarType.BFloat16 : ScalarType.Float32, device);
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
        var console = Consoles.Out;
        if (s.Format == "json")
        {
            var o = new JsonObject { ["target_layers"] = new JsonArray(targets.Select(t => (JsonNode)t).ToArray()) };
            foreach (var (n, r) in rows)
                o[n] = new JsonObject
                {
                    ["cb_cosine"] = r.CbCosine, ["cb_cosine_per_layer"] = new JsonArray(r.CbCosinePerLayer.Select(x => (JsonNode)x).ToArray()),
                    ["rr_loss"] = r.RerouteLoss, ["retain_distance"] = r.RetainDistance, ["retain_relative_distance"] = r.RetainRelativeDistance,
                    ["cb_examples"] = r.CbExamples, ["retain_examples"] = r.RetainExamples,
                };
            console.WriteLine(o.ToJsonString(new System.Text.Json.JsonSerializerOptions { WriteIndented = true }));
            return ExitCodes.Ok;
        }
        var table = new Table().AddColumn("model").AddColumn("CB cosine (targets " + string.Join(",", targets) + ")").AddColumn("per layer")
            .AddColumn("RR loss").AddColumn("retain ‖Δh‖").AddColumn("retain ‖Δh‖/‖h‖");
        foreach (var (n, r) in rows)
            table.AddRow(n, F(r.CbCosine), string.Join(" ", r.CbCosinePerLayer.Select(F)), F(r.RerouteLoss), F(r.RetainDistance), F(r.RetainRelativeDistance));
        console.Write(table);
        console.MarkupLine($"[grey]{cb.Count} held-out circuit-breaker and {retain.Count} retain examples; cosine 1 = unchanged, ≤ 0 = rerouted.[/]");
        return ExitCodes.Ok;
    }

    static string F(double x) => x.ToString("F4", CultureInfo.InvariantCulture);
}
