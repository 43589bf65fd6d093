using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
using MoeLora.Core.Analysis;
using MoeLora.Core.Memory;
using MoeLora.Torch.Training;

namespace MoeLora.Cli.Plans;

/// <summary>
/// The PyTorch side of a plan: <c>train.py</c>, one static script for every model (embedded from Plans/train.py),
/// and <c>train_settings.json</c>, everything that differs between plans. The script reads the settings, the plan's
/// adapter_config.json and moelora_plan.json (for the predicted peak), so nothing is substituted into its text.
/// A stand-in data set (the tiny preset's harmless JSONL) is written next to them, so the folder trains as is.
/// </summary>
public static class TrainScript
{
    public const string ScriptFile = "train.py";
    public const string SettingsFile = "train_settings.json";
    public const string DataFolder = "data";
    public const string Schema = "moelora.train/1";

    /// <summary>The data files the script reads by default, as <c>moelora train --preset tiny</c> reads them.</summary>
    static readonly (string Key, string File)[] DataFiles =
        [("cb", "cb_train.jsonl"), ("retain", "retain_train.jsonl"), ("refusal", "refusal.jsonl")];

    /// <summary>Roles a conversation in the retain data may use; each gets its rendered form in the settings.</summary>
    static readonly string[] Roles = ["system", "user", "assistant"];

    /// <summary>The script's text (the embedded resource; the same bytes for every plan).</summary>
    public static string Script()
    {
        using var stream = typeof(TrainScript).Assembly.GetManifestResourceStream("plans/train.py")
            ?? throw new InvalidOperationException("the tool carries no plans/train.py (build error: MoeLora.Cli.csproj embeds Plans/train.py)");
        using var reader = new StreamReader(stream);
        return reader.ReadToEnd();
    }

    /// <summary>
    /// The settings of one plan. Training defaults (steps, learning rate, schedule, clipping, loss weighting, seed) are
    /// those of the C# trainer (<see cref="TrainOptions"/>); batch, lengths, dtype, targets and truncation are the plan's,
    /// so the script runs the step whose memory the plan predicted.
    /// </summary>
    public static JsonObject Settings(LoraReport report)
    {
        var setup = report.Training.Setup;
        var spec = report.Spec;
        var cb = setup.Mode == TrainingMode.CircuitBreaker;
        var targets = setup.TargetLayers ?? HiddenStatesMemory.DefaultTargetLayers(spec.NumHiddenLayers);
        var defaults = new TrainOptions { TargetLayers = targets, OutputDir = "" };
        var template = ChatTemplate.Get(ChatTemplate.ForModelType(spec.ModelType));
        // The memory model runs every pass at --seq-length; the C# trainer sizes a step by max(request + response,
        // retain). Splitting the CB example into two halves keeps both equal to the planned length.
        int s = setup.SeqLength;
        return new JsonObject
        {
            ["schema"] = Schema,
            ["model"] = report.Options.ModelId,
            ["model_class"] = spec.Architecture,
            ["mode"] = TrainingSetup.Name(setup.Mode),
            ["dtype"] = setup.DType.Name(),
            ["quantization"] = TrainingSetup.Name(setup.Quantization),
            ["attention"] = TrainingSetup.Name(setup.Attention),
            ["gradient_checkpointing"] = setup.GradientCheckpointing,
            ["gpus"] = setup.Gpus,
            ["sharding"] = TrainingSetup.Name(setup.Sharding),
            ["batch_size"] = setup.BatchSize,
            ["seq_length"] = s,
            ["lengths"] = new JsonObject { ["request"] = s / 2, ["response"] = s - s / 2, ["retain"] = s },
            ["cb_target_layers"] = cb ? new JsonArray(targets.Select(t => (JsonNode)t).ToArray()) : null,
            // Blocks kept (reference §4: max(target)+1); null keeps the whole model.
            ["truncate_to_blocks"] = report.Training.LayersRun < spec.NumHiddenLayers ? report.Training.LayersRun : null,
            ["cb_alpha"] = defaults.Alpha,
            ["loss_weighting"] = defaults.LossWeighting,
            ["total_steps"] = defaults.TotalSteps,
            ["lr"] = defaults.LearningRate,
            ["lr_schedule"] = defaults.LrSchedule,
            ["warmup_steps"] = defaults.WarmupSteps,
            ["weight_decay"] = defaults.WeightDecay,
            ["max_grad_norm"] = defaults.MaxGradNorm,
            ["gradient_accumulation"] = defaults.GradientAccumulation,
            ["seed"] = defaults.Seed,
            ["chat_template"] = new JsonObject
            {
                ["name"] = template.Name,
                ["user_tag"] = template.UserTag,
                ["assistant_tag"] = template.AssistantTag,
                ["sep"] = template.Sep,
                ["conversation_prefix"] = template.ConversationPrefix ?? "",
                // Each role's message with {content} where the text goes (replaced literally, not str.format).
                ["messages"] = new JsonObject(Roles.Select(r => KeyValuePair.Create(r, (JsonNode?)template.Message(r, "{content}")))),
            },
            ["data"] = new JsonObject(DataFiles.Select(d => KeyValuePair.Create(d.Key, (JsonNode?)$"{DataFolder}/{d.File}"))
                .Append(KeyValuePair.Create("cb_drop_prompt", (JsonNode?)0.0))),
            ["output"] = "output",
        };
    }

    /// <summary>The files this adds to a plan folder: (name relative to the folder, text).</summary>
    public static IEnumerable<(string Name, string Text)> Files(LoraReport report)
    {
        // Relaxed escaping keeps chat tags readable (</s>, not \u003C/s\u003E); the file is JSON, never HTML.
        var opts = new System.Text.Json.JsonSerializerOptions { WriteIndented = true, Encoder = System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping };
        yield return (ScriptFile, Script());
        yield return (SettingsFile, Settings(report).ToJsonString(opts) + "\n");
        foreach (var (_, file) in DataFiles) yield return ($"{DataFolder}/{file}", TinyData.Text(file));
    }
}
