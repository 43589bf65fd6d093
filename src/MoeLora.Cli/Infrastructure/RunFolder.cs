using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using MoeLora.Core;
using MoeLora.Torch.Training;

namespace MoeLora.Cli.Infrastructure;

/// <summary>
/// The <c>train --output</c> folder, guarded so that no command destroys what the user has: a new run goes only into
/// a new or empty folder (or over an old one with <c>--overwrite</c>), <c>--resume</c> only continues a checkpoint
/// written with the same settings, and a run that fails before its first checkpoint leaves the folder as it found it.
/// </summary>
public sealed class RunFolder
{
    /// <summary>Files and folders a train run writes (the adapter, the checkpoint, metrics and plots).</summary>
    static readonly string[] RunEntries =
    [
        "checkpoint", "checkpoint.old", "metrics.jsonl", "loss_curves.png", "loss_curves.svg", "adapter_config.json",
        "adapter_model.safetensors", Checkpoints.RouterFile, "tokenizer.json",
    ];

    readonly bool _created, _wasEmpty;

    public string Path { get; }

    RunFolder(string path, bool created, bool wasEmpty) { Path = path; _created = created; _wasEmpty = wasEmpty; }

    public string CheckpointDir => System.IO.Path.Combine(Path, "checkpoint");

    /// <summary>
    /// Checks the folder before anything is loaded. Refuses a folder that holds a run (without --resume or
    /// --overwrite) or other files (without --overwrite); with --resume, refuses a missing checkpoint or one written with
    /// other settings, listing each. Creates nothing: <see cref="Create"/> does, once the work is about to start.
    /// </summary>
    public static void Check(string output, bool resume, bool overwrite, JsonObject settings)
    {
        if (File.Exists(output)) throw new UsageException($"--output {output} is a file; train writes a run folder.");
        var entries = Directory.Exists(output) ? Directory.EnumerateFileSystemEntries(output).Select(System.IO.Path.GetFileName).OfType<string>().ToList() : [];
        var checkpoint = Checkpoints.Find(System.IO.Path.Combine(output, "checkpoint"));
        if (resume)
        {
            if (checkpoint is null)
                throw new UserInputException($"--resume: {output} holds no checkpoint to continue ({(entries.Count == 0 ? "no run there" : "checkpoint/trainer_state.json is missing")}); start the run without --resume.");
            var state = Checkpoints.ReadState(checkpoint);
            var changed = Differences(checkpoint, state, settings);
            if (changed.Count > 0)
                throw new UserInputException($"--resume: the run in {output} was started with other settings ({string.Join("; ", changed)}); " +
                    "resume with the run's settings, or start a new run in another folder (or with --overwrite).");
            return;
        }
        if (entries.Count == 0 || overwrite) return;
        var ours = entries.Where(e => RunEntries.Contains(e, StringComparer.Ordinal)).ToList();
        if (ours.Count > 0)
        {
            string what = checkpoint is not null && Checkpoints.ReadState(checkpoint) is var s
                ? s.Step >= s.TotalSteps ? $"a finished run ({s.Step}/{s.TotalSteps} steps)" : $"a run stopped at step {s.Step}/{s.TotalSteps}"
                : $"a run's files ({string.Join(", ", ours.Take(3))})";
            throw new UserInputException($"--output {output} already holds {what}; pass --resume to continue it or --overwrite to replace it, or choose another folder.");
        }
        throw new UserInputException($"--output {output} is not empty ({Describe(entries)}) and holds no moelora run; choose a new or empty folder, or pass --overwrite to write into it.");
    }

    /// <summary>Creates (or, with --overwrite, clears the previous run's files from) the folder the run writes.</summary>
    public static RunFolder Create(string output, bool resume, bool overwrite)
    {
        bool created = !Directory.Exists(output);
        bool wasEmpty = created || !Directory.EnumerateFileSystemEntries(output).Any();
        if (!resume && overwrite && !wasEmpty)
        {
            // --overwrite replaces the previous run (a stale checkpoint must not be resumed into the new one); files
            // that are not a run's stay.
            foreach (var name in RunEntries)
            {
                var p = System.IO.Path.Combine(output, name);
                if (Directory.Exists(p)) Directory.Delete(p, true);
                else if (File.Exists(p)) File.Delete(p);
            }
        }
        Directory.CreateDirectory(output);
        return new RunFolder(output, created, wasEmpty && !resume);
    }

    /// <summary>
    /// After a failure: a folder that was new or empty and never got a checkpoint is put back as it was (removed, or
    /// emptied), so a failed command leaves nothing behind. A folder with a checkpoint is kept: that is resumable work.
    /// </summary>
    public void CleanUpAfterFailure()
    {
        if (!_wasEmpty || Checkpoints.Find(CheckpointDir) is not null) return;
        try
        {
            if (_created) Directory.Delete(Path, true);
            else
                foreach (var e in Directory.EnumerateFileSystemEntries(Path).ToList())
                    if (Directory.Exists(e)) Directory.Delete(e, true); else File.Delete(e);
        }
        catch (IOException) { } // the original error is what the user needs to see
        catch (UnauthorizedAccessException) { }
    }

    static string Describe(List<string> entries) =>
        string.Join(", ", entries.Order(StringComparer.Ordinal).Take(3)) + (entries.Count > 3 ? $" and {entries.Count - 3} more" : "");

    /// <summary>The flag each recorded setting comes from, for messages.</summary>
    static string Flag(string key) => key switch
    {
        "r" => "--rank", "lora_alpha" => "--lora-alpha", "lora_dropout" => "--lora-dropout", "target_modules" => "--target-modules",
        "target_parameters" => "--target-parameters", "layers_to_transform" => "--layers-to-transform",
        "init_lora_weights" => "--init-lora-weights", "use_dora" => "use_dora (--lora-config)", "use_rslora" => "use_rslora (--lora-config)",
        _ => "--" + key.Replace('_', '-'),
    };

    /// <summary>Every setting that differs between the checkpoint and this command line, as "--flag now (run: then)".</summary>
    static List<string> Differences(string checkpoint, CheckpointState state, JsonObject settings)
    {
        var changed = new List<string>();
        void Compare(string key, JsonNode? now, JsonNode? then)
        {
            if (!JsonNode.DeepEquals(Normal(now), Normal(then)))
                changed.Add($"{Flag(key)} {Show(now)} (run: {Show(then)})");
        }
        void CompareAll(JsonObject? now, JsonObject? then)
        {
            foreach (var (key, value) in now ?? [])
                Compare(key, value, then?[key]);
        }
        if (state.Settings is { } recorded)
        {
            CompareAll(settings["lora"] as JsonObject, recorded["lora"] as JsonObject);
            CompareAll(settings["run"] as JsonObject, recorded["run"] as JsonObject);
            return changed;
        }
        // A checkpoint from before settings were recorded: the adapter's shape from its adapter_config.json, and the
        // step count and seed it does record.
        var adapterPath = System.IO.Path.Combine(checkpoint, "adapter_config.json");
        JsonObject? adapter;
        try { adapter = JsonNode.Parse(File.ReadAllText(adapterPath)) as JsonObject; }
        catch (JsonException e) { throw new InvalidDataException($"{adapterPath} is not valid JSON ({e.Message.Split('\n')[0]}); the checkpoint is damaged."); }
        catch (FileNotFoundException) { throw new InvalidDataException($"{checkpoint} has no adapter_config.json; the checkpoint is damaged."); }
        if (adapter is null) throw new InvalidDataException($"{adapterPath} is not a JSON object; the checkpoint is damaged.");
        foreach (var key in new[] { "r", "lora_alpha", "target_modules", "target_parameters" })
            Compare(key, settings["lora"]?[key], adapter[key]);
        Compare("total_steps", settings["run"]?["total_steps"], state.TotalSteps);
        Compare("seed", settings["run"]?["seed"], state.Seed);
        return changed;
    }

    static JsonNode? Normal(JsonNode? node) => node switch
    {
        // 16 and 16.0 are the same setting; lists of names compare as sets (PEFT matches them as a set).
        JsonValue v when v.TryGetValue(out double d) => JsonValue.Create(d),
        JsonValue v when v.GetValueKind() == JsonValueKind.Number => JsonValue.Create(double.Parse(v.ToJsonString(), CultureInfo.InvariantCulture)),
        JsonArray a when a.All(x => x is JsonValue xv && xv.GetValueKind() == JsonValueKind.String) =>
            new JsonArray(a.Select(x => x!.GetValue<string>()).Distinct().Order(StringComparer.Ordinal).Select(x => (JsonNode)x).ToArray()),
        _ => node?.DeepClone(),
    };

    static string Show(JsonNode? node) => node switch
    {
        null => "unset",
        JsonArray a => string.Join(",", a.Select(x => x is JsonValue v && v.GetValueKind() == JsonValueKind.String ? v.GetValue<string>() : x?.ToJsonString())),
        JsonValue v when v.GetValueKind() == JsonValueKind.String => v.GetValue<string>(),
        _ => node.ToJsonString(),
    };
}
