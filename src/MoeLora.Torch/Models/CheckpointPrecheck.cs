using System.Text.RegularExpressions;
using MoeLora.Core.Architectures;
using MoeLora.Torch.IO;

namespace MoeLora.Torch.Models;

public static partial class CheckpointLoader
{
    /// <summary>
    /// Header-only check of a checkpoint against the model Core built from the same config: every shard present,
    /// every dtype readable, and every parameter of <paramref name="spec"/> present with its shape (per-expert Hub
    /// tensors are checked as the fused tensors they become). Reads no tensor data; the first problem is reported in
    /// one line. Returns the bytes the tensors take on disk.
    /// </summary>
    public static long Precheck(string dir, ModelSpec spec, string configJson)
    {
        var family = TorchModelFactory.FamilyFor(configJson);
        var shapes = new Dictionary<string, long[]>(StringComparer.Ordinal);
        long bytes = 0;
        foreach (var file in Files(dir))
        {
            IReadOnlyList<Safetensors.Entry> entries;
            try { entries = Safetensors.ReadHeader(file).Entries; }
            catch (InvalidDataException e) { throw new InvalidDataException(OneLine(e.Message)); }
            foreach (var e in entries)
            {
                var n = e.Name;
                foreach (var (from, to) in family.HubRenames) n = n.Replace(from, to, StringComparison.Ordinal);
                shapes[n] = e.Shape;
                bytes += e.End - e.Begin;
            }
        }
        // Per-expert tensors → fused shapes (gate_up: [E, rows(gate)+rows(up), in]; down: [E, out, in]).
        var fused = new Dictionary<string, (int Experts, long[]? Gate, long[]? Up, long[]? Down)>(StringComparer.Ordinal);
        foreach (var (name, shape) in shapes)
        {
            var m = PerExpert().Match(name);
            if (!m.Success) continue;
            var prefix = m.Groups["prefix"].Value;
            var f = fused.GetValueOrDefault(prefix);
            f.Experts = Math.Max(f.Experts, int.Parse(m.Groups["e"].Value) + 1);
            switch (m.Groups["w"].Value)
            {
                case "gate_proj" or "w1": f.Gate = shape; break;
                case "up_proj" or "w3": f.Up = shape; break;
                default: f.Down = shape; break;
            }
            fused[prefix] = f;
        }
        foreach (var (prefix, f) in fused)
        {
            if (f.Gate is { Length: 2 } g && f.Up is { Length: 2 } u) shapes[$"{prefix}.gate_up_proj"] = [f.Experts, g[0] + u[0], g[1]];
            if (f.Down is { Length: 2 } d) shapes[$"{prefix}.down_proj"] = [f.Experts, d[0], d[1]];
        }
        foreach (var p in spec.Tree.Parameters)
        {
            if (!shapes.TryGetValue(p.Name, out var s))
                throw new InvalidDataException($"checkpoint {dir} has no tensor for {p.Name} {Fmt(p.Shape)} (config.json and the weights disagree).");
            if (!s.SequenceEqual(p.Shape))
                throw new InvalidDataException($"checkpoint {dir}: {p.Name} is {Fmt(s)} but config.json implies {Fmt(p.Shape)}.");
        }
        return bytes;
    }

    static string Fmt(long[] s) => "[" + string.Join(",", s) + "]";

    static string OneLine(string s) => Regex.Replace(s, @"\s*\n\s*", " ");
}
