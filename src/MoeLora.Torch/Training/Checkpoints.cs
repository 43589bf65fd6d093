using System.Text.Json;
using System.Text.Json.Nodes;
using MoeLora.Torch.IO;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Training;

/// <param name="Settings">What the run was started with that a resume must not change (written by the CLI; null in
/// checkpoints from before it was recorded).</param>
public sealed record CheckpointState(int Step, int TotalSteps, long Seed, long OptimizerSteps, JsonObject? Settings = null);

/// <summary>
/// A checkpoint is a directory: the PEFT adapter (adapter_config.json, adapter_model.safetensors), optional
/// router.safetensors (--train-router), trainer_state.safetensors (AdamW moments, torch RNG state) and
/// trainer_state.json (step, seed). It is written to a temporary sibling and renamed into place, so a crash or
/// Ctrl-C at any moment leaves either the previous checkpoint or the new one (<c>checkpoint.old</c> is used if the
/// crash fell between the two renames).
/// </summary>
public static class Checkpoints
{
    public const string RouterFile = "router.safetensors";

    public static void Save(string dir, CausalLm model, InjectedAdapter adapter, AdamW optimizer,
        IReadOnlyList<(string Name, Parameter Param)> extra, CheckpointState state)
    {
        var full = Path.GetFullPath(dir);
        var tmp = full + $".tmp-{Environment.ProcessId}";
        InTemporaryFolder(tmp, full, () =>
        {
            WriteAdapterFiles(tmp, model, adapter, extra);
            var tensors = optimizer.StateTensors().ToList();
            using var rng = torch.get_rng_state();
            tensors.Add(new("rng_state", rng));
            Safetensors.Save(Path.Combine(tmp, "trainer_state.safetensors"), tensors);
            var json = new JsonObject
            {
                ["step"] = state.Step, ["total_steps"] = state.TotalSteps, ["seed"] = state.Seed,
                ["optimizer_steps"] = state.OptimizerSteps, ["format"] = "moelora-cb-checkpoint-1",
            };
            if (state.Settings is not null) json["settings"] = state.Settings.DeepClone();
            File.WriteAllText(Path.Combine(tmp, "trainer_state.json"), json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }));
            ReplaceDirectory(tmp, full);
        });
    }

    /// <summary>
    /// Runs a write into the temporary folder <paramref name="tmp"/> that stands for <paramref name="target"/>. A
    /// failure (a full disk, a permission) names the user's folder, never the temporary one, and leaves no
    /// temporary folder behind.
    /// </summary>
    public static void InTemporaryFolder(string tmp, string target, Action write)
    {
        try
        {
            if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
            Directory.CreateDirectory(tmp);
            write();
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new IOException(DescribeWriteFailure(e.Message, tmp, target), e);
        }
        finally
        {
            try { if (Directory.Exists(tmp)) Directory.Delete(tmp, true); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
        }
    }

    /// <summary>"cannot write TARGET: reason", with every mention of the temporary folder replaced by the target.</summary>
    public static string DescribeWriteFailure(string message, string tmp, string target) =>
        $"cannot write {target}: {message.Replace(tmp, target, StringComparison.Ordinal)}";

    /// <summary>Moves <paramref name="source"/> onto <paramref name="target"/>: target → target.old, source → target, delete old.</summary>
    public static void ReplaceDirectory(string source, string target)
    {
        var old = target + ".old";
        if (Directory.Exists(old)) Directory.Delete(old, true);
        if (Directory.Exists(target)) Directory.Move(target, old);
        Directory.Move(source, target);
        if (Directory.Exists(old)) Directory.Delete(old, true);
    }

    /// <summary>The usable checkpoint directory (<paramref name="dir"/> or its .old twin), or null.</summary>
    public static string? Find(string dir)
    {
        if (File.Exists(Path.Combine(dir, "trainer_state.json"))) return dir;
        var old = Path.GetFullPath(dir) + ".old";
        return File.Exists(Path.Combine(old, "trainer_state.json")) ? old : null;
    }

    /// <summary>
    /// Reads <c>trainer_state.json</c> of a checkpoint folder; a file that is not what <see cref="Save"/> writes is
    /// reported as bad data naming the file and the field.
    /// </summary>
    public static CheckpointState ReadState(string dir)
    {
        var path = Path.Combine(dir, "trainer_state.json");
        JsonObject json;
        try
        {
            json = JsonNode.Parse(File.ReadAllText(path)) as JsonObject
                ?? throw new InvalidDataException($"{path} is not a JSON object (a damaged checkpoint).");
        }
        catch (JsonException e)
        {
            throw new InvalidDataException($"{path} is not valid JSON ({e.Message.Split('\n')[0]}); the checkpoint is damaged.");
        }
        long Field(string key, long min)
        {
            try
            {
                if (json[key] is JsonValue v && v.TryGetValue(out long x) && x >= min) return x;
            }
            catch (FormatException) { }
            throw new InvalidDataException($"{path}: \"{key}\" is missing or not an integer ≥ {min}; the checkpoint is damaged.");
        }
        int step = (int)Math.Min(Field("step", 0), int.MaxValue), total = (int)Math.Min(Field("total_steps", 1), int.MaxValue);
        if (step > total) throw new InvalidDataException($"{path}: step {step} is past total_steps {total}; the checkpoint is damaged.");
        return new CheckpointState(step, total, Field("seed", long.MinValue), Field("optimizer_steps", 0), json["settings"] as JsonObject);
    }

    public static CheckpointState Load(string dir, CausalLm model, AdamW optimizer, IReadOnlyList<(string Name, Parameter Param)> extra)
    {
        var state = ReadState(dir);
        CopyAdapterWeights(model, dir);
        LoadExtra(dir, extra);
        var t = Safetensors.Load(Path.Combine(dir, "trainer_state.safetensors"));
        try
        {
            optimizer.LoadState(t, state.OptimizerSteps);
            torch.set_rng_state(t.TryGetValue("rng_state", out var rng) ? rng
                : throw new InvalidDataException($"{dir}: trainer_state.safetensors has no rng_state; the checkpoint is damaged."));
        }
        finally { foreach (var x in t.Values) x.Dispose(); }
        return state;
    }

    /// <summary>Copies adapter_model.safetensors (PEFT keys) into an already injected adapter with the same config.</summary>
    public static void CopyAdapterWeights(CausalLm model, string dir)
    {
        var tensors = Safetensors.Load(Path.Combine(dir, "adapter_model.safetensors"));
        try
        {
            using var _ = no_grad();
            int copied = 0;
            foreach (var (name, p) in LoraInjector.PeftNamedParameters(model))
            {
                var key = LoraInjector.SavedKey(name);
                if (!tensors.TryGetValue(key, out var src))
                {
                    if (name.Contains(".lora_")) throw new InvalidDataException($"{dir}: adapter_model.safetensors has no {key}.");
                    continue;
                }
                if (!src.shape.SequenceEqual(p.shape))
                    throw new InvalidDataException($"{dir}: adapter_model.safetensors holds {key} as [{string.Join(",", src.shape)}] but this adapter's is [{string.Join(",", p.shape)}] (another rank or target).");
                p.copy_(src); copied++;
            }
            int inModel = tensors.Keys.Count(k => !LoraInjector.BeyondDepth(k, model.NumLayers)); // untrained blocks past the truncation
            if (copied != inModel) throw new InvalidDataException($"{dir}: adapter_model.safetensors holds {inModel} tensors for these blocks, the adapter {copied}.");
        }
        finally { foreach (var x in tensors.Values) x.Dispose(); }
    }

    static void LoadExtra(string dir, IReadOnlyList<(string Name, Parameter Param)> extra)
    {
        if (extra.Count == 0) return;
        var path = Path.Combine(dir, RouterFile);
        if (!File.Exists(path)) throw new InvalidDataException($"{dir} has no {RouterFile} but the run trains the router.");
        var t = Safetensors.Load(path);
        try
        {
            using var _ = no_grad();
            foreach (var (n, p) in extra)
            {
                if (!t.TryGetValue(n, out var src) || !src.shape.SequenceEqual(p.shape))
                    throw new InvalidDataException($"{path} has no {n} [{string.Join(",", p.shape)}]; it was written for another model.");
                p.copy_(src);
            }
        }
        finally { foreach (var x in t.Values) x.Dispose(); }
    }

    static void WriteAdapterFiles(string dir, CausalLm model, InjectedAdapter adapter, IReadOnlyList<(string Name, Parameter Param)> extra)
    {
        LoraInjector.SavePeftAdapter(model, adapter, dir);
        if (extra.Count > 0)
            Safetensors.Save(Path.Combine(dir, RouterFile), extra.Select(e => new KeyValuePair<string, Tensor>(e.Name, e.Param)).ToList(),
                new Dictionary<string, string> { ["format"] = "pt", ["note"] = "full router weights trained with --train-router (runtime names)" });
    }

    /// <summary>Writes the adapter files into <paramref name="dir"/>: each file is written to a temporary sibling and renamed over the old one.</summary>
    public static void SaveAdapterAtomically(string dir, CausalLm model, InjectedAdapter adapter, IReadOnlyList<(string Name, Parameter Param)> extra)
    {
        var full = Path.GetFullPath(dir);
        Directory.CreateDirectory(full);
        var tmp = Path.Combine(full, $".adapter.tmp-{Environment.ProcessId}");
        InTemporaryFolder(tmp, full, () =>
        {
            WriteAdapterFiles(tmp, model, adapter, extra);
            foreach (var f in Directory.GetFiles(tmp)) File.Move(f, Path.Combine(full, Path.GetFileName(f)), overwrite: true);
        });
    }
}
