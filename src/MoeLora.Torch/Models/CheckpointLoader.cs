using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using MoeLora.Core.Modules;
using MoeLora.Torch.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Models;

/// <summary>
/// Reads a checkpoint (single <c>model.safetensors</c> or sharded via <c>model.safetensors.index.json</c>) into a
/// model. Each runtime tensor is taken under its own (transformers-5) name, or as Core's <see cref="CheckpointLayout"/>
/// says the checkpoint layout stores it: renamed, or as per-expert tensors stacked into a fused parameter
/// (<c>gate_up_proj[e] = cat(gate_e, up_e)</c>, <c>down_proj[e] = down_e</c>). Either layout, or a mix per tensor,
/// loads.
/// </summary>
public static partial class CheckpointLoader
{
    /// <summary>The checkpoint's files, checking every shard the index names exists before anything is read.</summary>
    public static IReadOnlyList<string> Files(string dir)
    {
        var index = Path.Combine(dir, "model.safetensors.index.json");
        if (File.Exists(index))
        {
            var map = Core.Util.UserJson.ParseObject(File.ReadAllText(index), index)["weight_map"] as JsonObject
                ?? throw new InvalidDataException($"{index}: no weight_map.");
            var files = map.Select(kv => kv.Value is JsonValue v && v.TryGetValue(out string? f) && f.Length > 0 && Path.GetFileName(f) == f ? f
                    : throw new InvalidDataException($"{index}: weight_map entry '{kv.Key}' is not a shard file name."))
                .Distinct().Select(f => Path.Combine(dir, f)).ToList();
            var missing = files.Where(f => !File.Exists(f)).ToList();
            if (missing.Count > 0) throw new FileNotFoundException($"Checkpoint {dir}: missing shard(s): {string.Join(", ", missing.Select(Path.GetFileName))}.");
            return files;
        }
        var single = Path.Combine(dir, "model.safetensors");
        if (File.Exists(single)) return [single];
        throw new FileNotFoundException($"No model.safetensors or model.safetensors.index.json in {dir}.");
    }

    /// <summary>
    /// Where a runtime tensor is stored: its own name, else the single renamed tensor or all per-expert parts of
    /// <paramref name="layout"/>'s alternative; null when <paramref name="has"/> finds neither.
    /// </summary>
    internal static (IReadOnlyList<string> Names, CheckpointLayout.Alternative? Alternative)? Stored(string runtimeName,
        CheckpointLayout? layout, Func<string, bool> has)
    {
        if (has(runtimeName)) return ([runtimeName], null);
        if (layout?.For(runtimeName) is not { IsSliceOfFused: false } alt || !alt.Parts.Any(p => has(p.Name))) return null;
        return (alt.Parts.Select(p => p.Name).ToList(), alt);
    }

    /// <summary>
    /// Copies the checkpoint into <paramref name="model"/>'s parameters and buffers (dtype-converting). Every state entry
    /// must be stored with the right shape and every stored tensor must be used: problems are reported together,
    /// before anything is copied. <paramref name="skipDeeperLayers"/>: a truncated model ignores the blocks it lacks.
    /// </summary>
    internal static void LoadInto(CausalLm model, string dir, bool skipDeeperLayers)
    {
        var raw = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        try
        {
            foreach (var f in Files(dir))
                foreach (var (k, v) in Safetensors.Load(f)) raw[k] = v;
            if (skipDeeperLayers)
            {
                var deeper = new Regex("^" + Regex.Escape(model.Spec.DecoderLayersPath) + @"\.(\d+)\.");
                foreach (var k in raw.Keys.ToList())
                    if (deeper.Match(k) is { Success: true } m && int.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture) >= model.NumLayers)
                    {
                        raw[k].Dispose();
                        raw.Remove(k);
                    }
            }
            Apply(model, raw);
        }
        finally { foreach (var t in raw.Values) t.Dispose(); }
    }

    static void Apply(CausalLm model, Dictionary<string, Tensor> raw)
    {
        var layout = CheckpointLayout.For(model.Spec);
        // A tied weight appears in the state dict under both names but is stored once (save_pretrained drops the
        // second name); keep the first name of each tensor object.
        var seen = new HashSet<Tensor>(ReferenceEqualityComparer.Instance);
        var all = model.StateDict().ToList();
        var state = all.Where(s => seen.Add(s.Value)).ToList();
        var tiedNames = all.Select(s => s.Name).Except(state.Select(s => s.Name)).ToHashSet(StringComparer.Ordinal);
        var errors = new List<string>();
        var consumed = new HashSet<string>(StringComparer.Ordinal);
        var sources = new List<(Tensor Target, Func<Tensor> Value)>();
        foreach (var (name, t) in state)
        {
            if (Stored(name, layout, raw.ContainsKey) is not { } stored)
            {
                errors.Add($"missing: {name} {Shape(t)}");
                continue;
            }
            var (names, alt) = stored;
            consumed.UnionWith(names);
            var absent = names.Where(n => !raw.ContainsKey(n)).ToList();
            if (absent.Count > 0) { errors.Add($"missing: {absent[0]} (one of the {names.Count} tensors stored for {name})"); continue; }
            if (alt is { IsStack: true })
            {
                var wrong = alt.Parts.FirstOrDefault(p => !raw[p.Name].shape.SequenceEqual(p.Shape));
                if (wrong is not null) { errors.Add($"shape mismatch: {wrong.Name} checkpoint {Shape(raw[wrong.Name])} vs model [{string.Join(",", wrong.Shape)}]"); continue; }
                sources.Add((t, () => Stack(alt, raw)));
            }
            else
            {
                var src = raw[names[0]];
                if (!src.shape.SequenceEqual(t.shape)) { errors.Add($"shape mismatch: {names[0]} checkpoint {Shape(src)} vs model {Shape(t)}"); continue; }
                sources.Add((t, () => src));
            }
        }
        errors.AddRange(raw.Keys.Where(k => !consumed.Contains(k) && !tiedNames.Contains(k)).Select(k => $"unexpected: {k}"));
        if (errors.Count > 0)
            throw new InvalidDataException($"Checkpoint does not match the {model.ModelType} model built from config.json:\n  " + string.Join("\n  ", errors.Take(40)));
        using (no_grad())
            foreach (var (target, value) in sources)
            {
                using var scope = NewDisposeScope();
                target.copy_(value());
            }
    }

    /// <summary>A fused [E, rows, cols] tensor from its per-expert parts (each expert's parts concatenated on rows).</summary>
    static Tensor Stack(CheckpointLayout.Alternative alt, IReadOnlyDictionary<string, Tensor> raw) =>
        stack(alt.Pieces().GroupBy(p => p.Expert).OrderBy(g => g.Key)
            .Select(g => cat(g.OrderBy(p => p.RowOffset).Select(p => raw[p.Part.Name]).ToArray(), 0)).ToArray(), 0);

    static string Shape(Tensor t) => "[" + string.Join(",", t.shape) + "]";
}
