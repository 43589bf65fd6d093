using System.Text.RegularExpressions;
using MoeLora.Core.Architectures;
using MoeLora.Core.Modules;
using MoeLora.Torch.IO;

namespace MoeLora.Torch.Models;

public static partial class CheckpointLoader
{
    /// <summary>
    /// Header-only check of a checkpoint against the model Core built from the same config: every shard present,
    /// every dtype readable, and every parameter of <paramref name="spec"/> stored with its shape, under its own name or
    /// as <see cref="CheckpointLayout"/> maps it (renamed, or per-expert tensors of a fused parameter). Reads no tensor
    /// data; the first problem is reported in one line. Returns the bytes the tensors take on disk.
    /// </summary>
    public static long Precheck(string dir, ModelSpec spec)
    {
        var shapes = new Dictionary<string, long[]>(StringComparer.Ordinal);
        long bytes = 0;
        foreach (var file in Files(dir))
        {
            IReadOnlyList<Safetensors.Entry> entries;
            try { entries = Safetensors.ReadHeader(file).Entries; }
            catch (InvalidDataException e) { throw new InvalidDataException(OneLine(e.Message)); }
            foreach (var e in entries)
            {
                shapes[e.Name] = e.Shape;
                bytes += e.End - e.Begin;
            }
        }
        var layout = CheckpointLayout.For(spec);
        foreach (var p in spec.Tree.Parameters)
        {
            if (Stored(p.Name, layout, shapes.ContainsKey) is not { } stored)
                throw new InvalidDataException($"checkpoint {dir} has no tensor for {p.Name} {Fmt(p.Shape)} (config.json and the weights disagree).");
            var (names, alt) = stored;
            var expected = alt is null ? [(names[0], p.Shape)] : alt.Parts.Select(x => (x.Name, x.Shape)).ToList();
            foreach (var (name, shape) in expected)
            {
                if (!shapes.TryGetValue(name, out var s))
                    throw new InvalidDataException($"checkpoint {dir} has no tensor {name} {Fmt(shape)} of {p.Name} (config.json and the weights disagree).");
                if (!s.SequenceEqual(shape))
                    throw new InvalidDataException($"checkpoint {dir}: {name} is {Fmt(s)} but config.json implies {Fmt(shape)}.");
            }
        }
        return bytes;
    }

    static string Fmt(long[] s) => "[" + string.Join(",", s) + "]";

    static string OneLine(string s) => Regex.Replace(s, @"\s*\n\s*", " ");
}
