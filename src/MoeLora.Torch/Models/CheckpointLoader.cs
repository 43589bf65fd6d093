using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using MoeLora.Torch.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Models;

/// <summary>
/// Reads a Hub-layout checkpoint (single <c>model.safetensors</c> or sharded via <c>model.safetensors.index.json</c>)
/// and converts it to transformers-v5 runtime names: per-expert <c>experts.{e}.(gate|up|down)_proj</c> or Mixtral
/// <c>w1/w3/w2</c> are stacked into <c>experts.gate_up_proj [E,2I,H]</c> = cat(gate, up) on dim 1 and
/// <c>experts.down_proj [E,H,I]</c>. Files already in the fused layout pass through.
/// </summary>
public static partial class CheckpointLoader
{
    [GeneratedRegex(@"^(?<prefix>.*\.experts)\.(?<e>\d+)\.(?<w>gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$")]
    private static partial Regex PerExpert();

    /// <summary>The checkpoint's files, checking every shard the index names exists before anything is read.</summary>
    public static IReadOnlyList<string> Files(string dir)
    {
        var index = Path.Combine(dir, "model.safetensors.index.json");
        if (File.Exists(index))
        {
            var map = JsonNode.Parse(File.ReadAllText(index))?["weight_map"]?.AsObject()
                ?? throw new InvalidDataException($"{index}: no weight_map.");
            var files = map.Select(kv => kv.Value!.GetValue<string>()).Distinct().Select(f => Path.Combine(dir, f)).ToList();
            var missing = files.Where(f => !File.Exists(f)).ToList();
            if (missing.Count > 0) throw new FileNotFoundException($"Checkpoint {dir}: missing shard(s): {string.Join(", ", missing.Select(Path.GetFileName))}.");
            return files;
        }
        var single = Path.Combine(dir, "model.safetensors");
        if (File.Exists(single)) return [single];
        throw new FileNotFoundException($"No model.safetensors or model.safetensors.index.json in {dir}.");
    }

    /// <summary>Loads all tensors and returns them under runtime names.</summary>
    internal static Dictionary<string, Tensor> LoadRuntime(string dir, IModelFamily family)
    {
        var raw = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var f in Files(dir))
            foreach (var (k, v) in Safetensors.Load(f)) raw[k] = v;
        return ToRuntime(raw, family.HubRenames);
    }

    internal static Dictionary<string, Tensor> ToRuntime(Dictionary<string, Tensor> raw, IEnumerable<(string From, string To)> renames)
    {
        var renamed = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var (k, v) in raw)
        {
            var n = k;
            foreach (var (from, to) in renames) n = n.Replace(from, to, StringComparison.Ordinal);
            renamed[n] = v;
        }
        var result = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        var groups = new Dictionary<string, SortedDictionary<int, Dictionary<string, Tensor>>>(StringComparer.Ordinal);
        foreach (var (k, v) in renamed)
        {
            var m = PerExpert().Match(k);
            if (!m.Success) { result[k] = v; continue; }
            var prefix = m.Groups["prefix"].Value;
            if (!groups.TryGetValue(prefix, out var byExpert)) groups[prefix] = byExpert = [];
            int e = int.Parse(m.Groups["e"].Value);
            if (!byExpert.TryGetValue(e, out var w)) byExpert[e] = w = [];
            w[m.Groups["w"].Value switch { "w1" => "gate_proj", "w3" => "up_proj", "w2" => "down_proj", var x => x }] = v;
        }
        foreach (var (prefix, byExpert) in groups)
        {
            var ids = byExpert.Keys.ToList();
            if (ids[0] != 0 || ids[^1] != ids.Count - 1)
                throw new InvalidDataException($"{prefix}: expert indices are not contiguous from 0 ({string.Join(",", ids)}).");
            Tensor Get(int e, string w) => byExpert[e].TryGetValue(w, out var t) ? t
                : throw new InvalidDataException($"{prefix}.{e}.{w}.weight is missing from the checkpoint.");
            result[$"{prefix}.gate_up_proj"] = stack(ids.Select(e => cat([Get(e, "gate_proj"), Get(e, "up_proj")], 0)).ToArray(), 0);
            result[$"{prefix}.down_proj"] = stack(ids.Select(e => Get(e, "down_proj")).ToArray(), 0);
        }
        return result;
    }

    /// <summary>
    /// Copies tensors into the model's state (dtype-converting). Every state entry must be present with the right
    /// shape, and every tensor must be used: mismatches are reported together, before anything is copied.
    /// </summary>
    internal static void Apply(CausalLm model, Dictionary<string, Tensor> tensors)
    {
        // A tied weight appears in the state dict under both names but is stored once (save_pretrained drops the
        // second name); keep the first name of each tensor object.
        var seen = new HashSet<Tensor>(ReferenceEqualityComparer.Instance);
        var all = model.StateDict().ToList();
        var state = all.Where(s => seen.Add(s.Value)).ToList();
        var tiedNames = all.Select(s => s.Name).Except(state.Select(s => s.Name)).ToHashSet();
        var errors = new List<string>();
        foreach (var (name, t) in state)
        {
            if (!tensors.TryGetValue(name, out var src)) errors.Add($"missing: {name} {Shape(t)}");
            else if (!src.shape.SequenceEqual(t.shape)) errors.Add($"shape mismatch: {name} checkpoint {Shape(src)} vs model {Shape(t)}");
        }
        var known = state.Select(s => s.Name).Concat(tiedNames).ToHashSet();
        errors.AddRange(tensors.Keys.Where(k => !known.Contains(k)).Select(k => $"unexpected: {k}"));
        if (errors.Count > 0)
            throw new InvalidDataException($"Checkpoint does not match the {model.ModelType} model built from config.json:\n  " + string.Join("\n  ", errors.Take(40)));
        using (no_grad())
            foreach (var (name, t) in state) t.copy_(tensors[name]);
    }

    static string Shape(Tensor t) => "[" + string.Join(",", t.shape) + "]";
}
