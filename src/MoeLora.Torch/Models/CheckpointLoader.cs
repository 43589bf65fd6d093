using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using Microsoft.Win32.SafeHandles;
using MoeLora.Core.Modules;
using MoeLora.Torch.IO;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Models;

/// <summary>
/// Reads a checkpoint (single <c>model.safetensors</c> or sharded via <c>model.safetensors.index.json</c>) into a
/// model. Each runtime tensor is taken under its own (transformers-5) name, or as Core's <see cref="CheckpointLayout"/>
/// says the checkpoint layout stores it: renamed, or as per-expert tensors stacked into a fused parameter
/// (<c>gate_up_proj[e] = cat(gate_e, up_e)</c>, <c>down_proj[e] = down_e</c>), or rows of a tensor whose rows alternate
/// gate and up (<see cref="CheckpointLayout.InterleavedRows"/>), or its rows of one fused stored tensor (a chunk), or a
/// stored tensor transposed (ERNIE 4.5 VL's [H, E] routers).
/// Either layout, or a mix per tensor, loads.
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

    /// <summary>The decoder layers' path in the checkpoint (v4) layout, or null when the config has no such tree.</summary>
    static string? CheckpointLayersPath(Core.Architectures.ModelSpec spec)
    {
        try { return Core.Architectures.ArchitectureRegistry.Build(spec.Config, Layout.V4).DecoderLayersPath; }
        catch (Core.Config.ConfigException) { return null; }
    }

    /// <summary>
    /// The decoder layers' paths where <see cref="CheckpointLayout"/> stores layer 0's tensors under other names: what
    /// precedes the first ".0." of each stored name (a layer's index comes before any expert's). A multimodal checkpoint
    /// may nest its language model differently from its v4 spec's layer path (Kimi K2.5's
    /// <c>language_model.model.blocks</c> for <c>model.language_model.layers</c>).
    /// </summary>
    static IEnumerable<string> StoredLayersPaths(Core.Architectures.ModelSpec spec)
    {
        var layer0 = spec.DecoderLayersPath + ".0.";
        foreach (var (name, alt) in CheckpointLayout.For(spec)?.Alternatives ?? new Dictionary<string, CheckpointLayout.Alternative>())
        {
            if (!name.StartsWith(layer0, StringComparison.Ordinal)) continue;
            foreach (var part in alt.Parts)
                if (part.Name.IndexOf(".0.", StringComparison.Ordinal) is > 0 and var at) yield return part.Name[..at];
        }
    }

    /// <summary>
    /// Copies the checkpoint into <paramref name="model"/>'s parameters and buffers (dtype-converting) straight onto the
    /// model's device, one stored tensor at a time: headers are checked first (every state entry stored with the right
    /// shape, every stored tensor used; problems reported together, before anything is read), then each tensor is read
    /// with positioned reads into either the parameter itself (CPU, same dtype) or one host staging tensor that is
    /// copied to the device and freed, so host memory is bounded by the largest stored tensor, not the model.
    /// Per-expert parts are copied into their slice of the fused parameter on the device (no host-side stack).
    /// <paramref name="skipDeeperLayers"/>: a truncated model ignores the blocks it lacks.
    /// </summary>
    internal static LoadStats LoadInto(CausalLm model, string dir, bool skipDeeperLayers, Action<LoadProgress>? progress = null)
    {
        var stored = new Dictionary<string, (string File, Safetensors.Entry Entry, long DataStart)>(StringComparer.Ordinal);
        foreach (var f in Files(dir))
        {
            var (entries, _, start) = Safetensors.ReadHeader(f);
            foreach (var e in entries) stored[e.Name] = (f, e, start);
        }
        if (skipDeeperLayers)
        {
            // The checkpoint may name the layers as the checkpoint layout does (Nemotron-H's backbone.layers).
            var paths = new[] { model.Spec.DecoderLayersPath, CheckpointLayersPath(model.Spec) }.OfType<string>()
                .Concat(StoredLayersPaths(model.Spec)).Distinct().ToList();
            var deeper = new Regex("^(" + string.Join("|", paths.Select(Regex.Escape)) + @")\.(\d+)\.");
            foreach (var k in stored.Keys.ToList())
                if (deeper.Match(k) is { Success: true } m && int.Parse(m.Groups[2].Value, System.Globalization.CultureInfo.InvariantCulture) >= model.NumLayers)
                    stored.Remove(k);
        }
        var copies = Plan(model, stored.ToDictionary(kv => kv.Key, kv => kv.Value.Entry.Shape, StringComparer.Ordinal));
        var handles = new Dictionary<string, SafeFileHandle>(StringComparer.Ordinal);
        var stats = new LoadStats();
        long totalBytes = copies.Sum(c => Bytes(SourceEntry(c, stored[c.Source].Entry)));
        try
        {
            using var _ = no_grad();
            foreach (var c in copies)
            {
                var (file, whole, dataStart) = stored[c.Source];
                var entry = SourceEntry(c, whole);
                if (!handles.TryGetValue(file, out var handle)) handles[file] = handle = File.OpenHandle(file);
                using var scope = NewDisposeScope();
                var target = c.Expert is { } e ? c.Target[e].narrow(0, c.RowOffset, entry.Shape[0])
                    : c.Rows ? c.Target.narrow(c.Dim, c.RowOffset, entry.Shape[c.Dim]) : c.Target;
                Copy(handle, dataStart, entry, target, stats, Transform(c));
                stats.Tensors++;
                stats.BytesRead += Bytes(entry);
                progress?.Invoke(new LoadProgress(stats.Tensors, copies.Count, stats.BytesRead, totalBytes, c.Source));
            }
        }
        finally { foreach (var h in handles.Values) h.Dispose(); }
        return stats;
    }

    /// <summary>
    /// One stored tensor's destination: a whole state entry, or (<c>Rows</c>) its rows from <c>RowOffset</c> along
    /// <c>Dim</c>, of expert <c>Expert</c>'s slice when that is set (per-expert parts) or of the whole entry (concatenated
    /// parts); or (<c>Chunk</c>) the whole entry taken from a row chunk of the stored tensor; a whole entry may take the
    /// stored tensor's gate/up-interleaved rows (<c>Interleaved</c>) or the stored 2-D tensor transposed (<c>Transposed</c>).
    /// </summary>
    sealed record CopyStep(string Source, Tensor Target, int? Expert, long RowOffset, bool Rows, int Dim = 0, CheckpointLayout.RopeChunk? Chunk = null,
        CheckpointLayout.InterleavedRows Interleaved = CheckpointLayout.InterleavedRows.None, bool Transposed = false);

    /// <summary>Matches state entries to stored tensors by shape (headers only); all problems in one exception.</summary>
    static List<CopyStep> Plan(CausalLm model, Dictionary<string, long[]> stored)
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
        var steps = new List<CopyStep>();
        var derived = model.DerivedBuffers().ToHashSet(StringComparer.Ordinal);
        foreach (var (name, t) in state)
        {
            if (Stored(name, layout, stored.ContainsKey) is not { } where)
            {
                // A buffer the model computed from the config keeps that value when the checkpoint lacks it.
                if (!derived.Contains(name)) errors.Add($"missing: {name} {Shape(t)}");
                continue;
            }
            var (names, alt) = where;
            consumed.UnionWith(names);
            var absent = names.Where(n => !stored.ContainsKey(n)).ToList();
            if (absent.Count > 0) { errors.Add($"missing: {absent[0]} (one of the {names.Count} tensors stored for {name})"); continue; }
            if (alt is { IsStack: true } or { Concatenated: true })
            {
                var wrong = alt.Parts.FirstOrDefault(p => !stored[p.Name].SequenceEqual(p.Shape));
                if (wrong is not null) { errors.Add($"shape mismatch: {wrong.Name} checkpoint {Fmt(stored[wrong.Name])} vs model [{string.Join(",", wrong.Shape)}]"); continue; }
                steps.AddRange(alt.Pieces().Select(p => new CopyStep(p.Part.Name, t, p.Expert < 0 ? null : p.Expert, p.RowOffset, Rows: true, alt.ConcatDim)));
            }
            else if (alt?.Chunk is { } chunk)
            {
                var src = stored[names[0]];
                if (!src.Skip(1).SequenceEqual(t.shape.Skip(1)) || chunk.Offset + t.shape[0] > src[0])
                { errors.Add($"shape mismatch: {names[0]} checkpoint {Fmt(src)} holds no rows [{chunk.Offset}, {chunk.Offset + t.shape[0]}) for {name} {Shape(t)}"); continue; }
                steps.Add(new CopyStep(names[0], t, null, 0, Rows: false, Chunk: chunk));
            }
            else if (alt is { Interleaved: not CheckpointLayout.InterleavedRows.None })
            {
                var src = stored[names[0]];
                if (!src.SequenceEqual(alt.Parts[0].Shape) || !DeinterleavedShape(src, alt.Interleaved).SequenceEqual(t.shape))
                { errors.Add($"shape mismatch: {names[0]} checkpoint {Fmt(src)} vs model {Shape(t)} ({alt.Interleaved} rows)"); continue; }
                steps.Add(new CopyStep(names[0], t, null, 0, Rows: false, Interleaved: alt.Interleaved));
            }
            else if (alt is { Transposed: true })
            {
                var src = stored[names[0]];
                if (src.Length != 2 || !src.Reverse().SequenceEqual(t.shape))
                { errors.Add($"shape mismatch: {names[0]} checkpoint {Fmt(src)} vs model {Shape(t)} (stored transposed)"); continue; }
                steps.Add(new CopyStep(names[0], t, null, 0, Rows: false, Transposed: true));
            }
            else
            {
                var src = stored[names[0]];
                if (!src.SequenceEqual(t.shape)) { errors.Add($"shape mismatch: {names[0]} checkpoint {Fmt(src)} vs model {Shape(t)}"); continue; }
                steps.Add(new CopyStep(names[0], t, null, 0, Rows: false));
            }
        }
        errors.AddRange(stored.Keys.Where(k => !consumed.Contains(k) && !tiedNames.Contains(k)).Select(k => $"unexpected: {k}"));
        if (errors.Count > 0)
            throw new InvalidDataException($"Checkpoint does not match the {model.ModelType} model built from config.json:\n  " + string.Join("\n  ", errors.Take(40)));
        return steps;
    }

    /// <summary>
    /// Reads one stored tensor into <paramref name="target"/>: directly into its memory when it is a contiguous CPU
    /// tensor of the file's dtype, else through a host staging tensor of the file's dtype (copy_ converts dtype and
    /// moves it to the device).
    /// </summary>
    static void Copy(SafeFileHandle handle, long dataStart, Safetensors.Entry entry, Tensor target, LoadStats stats,
        Func<Tensor, Tensor>? transform)
    {
        long bytes = entry.End - entry.Begin;
        if (transform is null && target.device_type == DeviceType.CPU
            && target.dtype == entry.ScalarType && target.is_contiguous())
        {
            Safetensors.ReadInto(handle, dataStart + entry.Begin, bytes, target);
            return;
        }
        using var staging = empty(entry.Shape, entry.ScalarType);
        Safetensors.ReadInto(handle, dataStart + entry.Begin, bytes, staging);
        stats.LargestStagingBytes = Math.Max(stats.LargestStagingBytes, bytes);
        target.copy_(transform is null ? staging : transform(staging));
        if (target.device_type != DeviceType.CPU) stats.DeviceCopies++;
    }

    /// <summary>
    /// The bytes a step reads: the whole stored tensor, or for a chunk only its rows [Offset, Offset + rows of the
    /// target), one contiguous range of the row-major data.
    /// </summary>
    static Safetensors.Entry SourceEntry(CopyStep c, Safetensors.Entry e)
    {
        if (c.Chunk is not { } chunk) return e;
        long rows = c.Target.shape[0], rowBytes = (e.End - e.Begin) / e.Shape[0];
        return e with { Shape = [rows, .. e.Shape[1..]], Begin = e.Begin + chunk.Offset * rowBytes, End = e.Begin + (chunk.Offset + rows) * rowBytes };
    }

    static long Bytes(Safetensors.Entry e) => e.End - e.Begin;

    /// <summary>What a step does to the stored rows before they land: de-interleave gate/up, transpose, or the rope permutation of a chunk.</summary>
    static Func<Tensor, Tensor>? Transform(CopyStep c) =>
        c.Interleaved != CheckpointLayout.InterleavedRows.None ? s => Deinterleave(s, c.Interleaved)
        : c.Transposed ? s => s.t()
        : c.Chunk is { PermuteHeads: > 0 } chunk ? s => RopePermutation(s, chunk.PermuteHeads, inverse: false)
        : null;

    /// <summary>The shape <see cref="Deinterleave"/> gives for a stored shape (empty when its rows cannot pair up).</summary>
    static long[] DeinterleavedShape(long[] stored, CheckpointLayout.InterleavedRows which)
    {
        var shape = (long[])stored.Clone();
        if (shape.Length < 2 || shape[^2] % 2 != 0) return [];
        if (which is CheckpointLayout.InterleavedRows.Even or CheckpointLayout.InterleavedRows.Odd) shape[^2] /= 2;
        return shape;
    }

    /// <summary>
    /// The rows <paramref name="which"/> names of a tensor whose rows (its last-but-one dimension) alternate gate and up:
    /// transformers' <c>Interleave</c> (rows viewed as [n, 2], transposed to [2, n]), then its <c>Chunk</c> for a
    /// separate gate or up. Views only: the copy into the parameter makes them contiguous.
    /// </summary>
    static Tensor Deinterleave(Tensor stored, CheckpointLayout.InterleavedRows which)
    {
        if (which == CheckpointLayout.InterleavedRows.None) return stored;
        int rowsDim = (int)stored.dim() - 2;
        var shape = stored.shape;
        var pairs = stored.unflatten(rowsDim, [shape[rowsDim] / 2, 2]);               // [..., n, 2, cols]
        return which switch
        {
            CheckpointLayout.InterleavedRows.Even => pairs.select(rowsDim + 1, 0),
            CheckpointLayout.InterleavedRows.Odd => pairs.select(rowsDim + 1, 1),
            _ => pairs.transpose(rowsDim, rowsDim + 1).reshape(shape),
        };
    }

    /// <summary>
    /// The inverse of <see cref="Deinterleave"/>, as saving does: the stored tensor whose rows alternate gate and up,
    /// from either one runtime tensor holding all gate rows then all up rows (<c>EvenThenOdd</c>) or the runtime gate
    /// (<c>Even</c>) and up (<c>Odd</c>) tensors, in any order.
    /// </summary>
    internal static Tensor Interleave(IReadOnlyList<(Tensor Rows, CheckpointLayout.InterleavedRows Which)> parts)
    {
        Tensor Pairs(Tensor gate, Tensor up) => stack([gate, up], gate.dim() - 1).flatten(gate.dim() - 2, gate.dim() - 1);
        if (parts is [{ Which: CheckpointLayout.InterleavedRows.EvenThenOdd } whole])
        {
            var halves = whole.Rows.chunk(2, whole.Rows.dim() - 2);
            return Pairs(halves[0], halves[1]);
        }
        var gate = parts.Where(p => p.Which == CheckpointLayout.InterleavedRows.Even).Select(p => p.Rows).ToList();
        var up = parts.Where(p => p.Which == CheckpointLayout.InterleavedRows.Odd).Select(p => p.Rows).ToList();
        if (gate.Count != 1 || up.Count != 1 || parts.Count != 2)
            throw new InvalidDataException($"an interleaved gate/up tensor needs one gate and one up part, got {string.Join(", ", parts.Select(p => p.Which))}.");
        return Pairs(gate[0], up[0]);
    }

    /// <summary>
    /// transformers' PermuteForRope on a [rows, ...] tensor of <paramref name="heads"/> heads: each head's rows viewed as
    /// (half, 2) and transposed to (2, half) on load; <paramref name="inverse"/> undoes it (viewed as (2, half)), as saving does.
    /// </summary>
    internal static Tensor RopePermutation(Tensor rows, long heads, bool inverse)
    {
        long n = rows.shape[0], half = n / heads / 2;
        var rest = rows.shape.Skip(1).ToArray();
        var viewed = rows.reshape([heads, inverse ? 2 : half, inverse ? half : 2, .. rest]);
        return viewed.transpose(1, 2).reshape([n, .. rest]);
    }

    static string Shape(Tensor t) => "[" + string.Join(",", t.shape) + "]";
}

/// <summary>Progress of a checkpoint load: tensors and bytes read so far of the totals, and the tensor just read.</summary>
public sealed record LoadProgress(int Tensors, int TotalTensors, long Bytes, long TotalBytes, string Current);

/// <summary>What a checkpoint load did; <see cref="LargestStagingBytes"/> is the host memory it needed beyond the model.</summary>
public sealed class LoadStats
{
    public int Tensors { get; internal set; }
    public long BytesRead { get; internal set; }
    /// <summary>The largest host staging tensor (0 when every tensor was read straight into a CPU parameter).</summary>
    public long LargestStagingBytes { get; internal set; }
    /// <summary>Tensors copied host-to-device.</summary>
    public int DeviceCopies { get; internal set; }
}
