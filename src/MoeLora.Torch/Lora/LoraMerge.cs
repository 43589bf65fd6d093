using MoeLora.Core.Modules;
using MoeLora.Torch.IO;
using MoeLora.Torch.Models;
using TorchSharp;
using static TorchSharp.torch;
using MoeLora.Core;

namespace MoeLora.Torch.Lora;

/// <summary>
/// PEFT's <c>merge_and_unload()</c> for an injected model: every enabled adapter's ΔW is folded into its base weight
/// (Linear: W + s·BA; DoRA: (m/‖W+s·BA‖)·(W+s·BA); fused experts: W + ΔW per expert; 2-D parameters: W + s·BA),
/// and the result is written as a checkpoint in the <em>source checkpoint's</em> own layout: the same files (shards
/// and index), keys and dtypes, per-expert tensors sliced back out of the fused ones, chunked tensors concatenated, transposed
/// tensors transposed back and gate/up rows interleaved again as Core's
/// <see cref="CheckpointLayout"/> maps them, other files copied.
/// </summary>
public static class LoraMerge
{
    /// <summary>The merged model's state under the base model's runtime names (no <c>base_layer.</c>, no LoRA tensors).</summary>
    public static Dictionary<string, Tensor> MergedState(CausalLm model)
    {
        var merged = new Dictionary<Tensor, Tensor>(ReferenceEqualityComparer.Instance);
        using (no_grad())
            foreach (var w in model.NamedModules().Select(m => m.Module).OfType<LoraWrapper>())
            {
                if (!w.Enabled) continue;
                var current = merged.TryGetValue(w.Target, out var t) ? t : w.Target.detach();
                merged[w.Target] = w.Merge(current);
            }
        var state = new Dictionary<string, Tensor>(StringComparer.Ordinal);
        foreach (var (name, value) in model.StateDict())
        {
            if (name.Contains(".lora_", StringComparison.Ordinal)) continue;
            var clean = name.Replace(".base_layer", "", StringComparison.Ordinal);
            state.TryAdd(clean, merged.TryGetValue(value, out var m) ? m : value.detach());
        }
        return state;
    }

    /// <summary>
    /// Writes the merged weights of <paramref name="model"/> (loaded from <paramref name="checkpointDir"/>, all layers)
    /// into <paramref name="outDir"/> with the checkpoint's file names, keys and dtypes; non-weight files are copied.
    /// </summary>
    public static void SaveHubCheckpoint(CausalLm model, string checkpointDir, string outDir)
    {
        var configJson = File.ReadAllText(Path.Combine(checkpointDir, "config.json"));
        long layers = TorchModelFactory.Spec(configJson).NumHiddenLayers;
        if (layers != model.NumLayers)
            throw new UserInputException($"the model has {model.NumLayers} blocks but {checkpointDir} has {layers}: merge needs the whole model.");
        // Checkpoint tensor → (runtime tensor, expert slice) for tensors stored under the other layout's names.
        var storedAs = new Dictionary<string, (string Runtime, int Expert, long RowOffset, long Rows, int Dim, bool Transposed)>(StringComparer.Ordinal);
        // Checkpoint tensor → the runtime tensors chunked out of it (q, k, v of a fused in_proj), in row order.
        var chunkedInto = new Dictionary<string, List<(string Runtime, CheckpointLayout.RopeChunk Chunk)>>(StringComparer.Ordinal);
        // Checkpoint tensor → the runtime tensors de-interleaved from it (gate and up rows alternating on disk).
        var interleavedInto = new Dictionary<string, List<(string Runtime, CheckpointLayout.InterleavedRows Which)>>(StringComparer.Ordinal);
        foreach (var (runtime, alt) in CheckpointLayout.For(model.Spec)?.Alternatives ?? new Dictionary<string, CheckpointLayout.Alternative>())
        {
            if (alt.IsSliceOfFused) continue;
            if (alt.Interleaved != CheckpointLayout.InterleavedRows.None)
            {
                if (!interleavedInto.TryGetValue(alt.Parts[0].Name, out var halves)) interleavedInto[alt.Parts[0].Name] = halves = [];
                halves.Add((runtime, alt.Interleaved));
            }
            else if (alt.IsStack || alt.Concatenated)
                foreach (var (part, expert, offset) in alt.Pieces()) storedAs[part.Name] = (runtime, expert, offset, part.Shape[alt.ConcatDim], alt.ConcatDim, false);
            else if (alt.Chunk is { } chunk)
            {
                if (!chunkedInto.TryGetValue(alt.Parts[0].Name, out var list)) chunkedInto[alt.Parts[0].Name] = list = [];
                list.Add((runtime, chunk));
            }
            else storedAs[alt.Parts[0].Name] = (runtime, -1, 0, 0, 0, alt.Transposed);
        }
        var state = MergedState(model);
        var used = new HashSet<string>(StringComparer.Ordinal);
        var files = CheckpointLoader.Files(checkpointDir);
        var full = Path.GetFullPath(outDir);
        if (Path.GetFullPath(checkpointDir).TrimEnd('/') == full.TrimEnd('/')) throw new UserInputException("the output folder must differ from the checkpoint folder.");
        // The merged checkpoint replaces outDir as a whole, so it must hold nothing of the user's.
        if (Directory.Exists(full) && Directory.EnumerateFileSystemEntries(full).Any())
            throw new UserInputException($"{outDir} is not empty; merge writes into a new or empty folder.");
        var tmp = full + $".tmp-{Environment.ProcessId}";
        if (Directory.Exists(tmp)) Directory.Delete(tmp, true);
        Directory.CreateDirectory(tmp);
        try
        {
            foreach (var file in files)
            {
                var (entries, metadata, _) = Safetensors.ReadHeader(file);
                var tensors = new List<KeyValuePair<string, Tensor>>();
                using var scope = NewDisposeScope();
                foreach (var e in entries)
                {
                    Tensor value;
                    if (state.ContainsKey(e.Name)) value = Get(e.Name);
                    else if (storedAs.TryGetValue(e.Name, out var at))
                        value = at.Expert >= 0 ? Get(at.Runtime)[at.Expert].narrow(0, at.RowOffset, at.Rows)
                            : at.Rows > 0 ? Get(at.Runtime).narrow(at.Dim, at.RowOffset, at.Rows)
                            : at.Transposed ? Get(at.Runtime).t() : Get(at.Runtime);
                    else if (chunkedInto.TryGetValue(e.Name, out var chunks))
                        // Saving undoes the load's rope permutation, then concatenates the chunks (transformers' reverse ops).
                        value = cat(chunks.OrderBy(c => c.Chunk.Offset).Select(c => c.Chunk.PermuteHeads > 0
                            ? CheckpointLoader.RopePermutation(Get(c.Runtime), c.Chunk.PermuteHeads, inverse: true) : Get(c.Runtime)).ToList(), 0);
                    else if (interleavedInto.TryGetValue(e.Name, out var halves))
                        value = CheckpointLoader.Interleave(halves.Select(h => (Get(h.Runtime), h.Which)).ToList());
                    else throw new InvalidDataException($"the checkpoint's {e.Name} has no counterpart in the merged model.");
                    if (!value.shape.SequenceEqual(e.Shape))
                        throw new InvalidDataException($"{e.Name}: merged shape [{string.Join(",", value.shape)}] differs from the checkpoint's [{string.Join(",", e.Shape)}].");
                    tensors.Add(new(e.Name, value.to(e.ScalarType).contiguous()));
                }
                Safetensors.Save(Path.Combine(tmp, Path.GetFileName(file)), tensors, metadata.Count > 0 ? metadata : new Dictionary<string, string> { ["format"] = "pt" });
            }
            // A tied lm_head is the embedding's Parameter: transformers does not save it, and it was written as the embedding.
            var unused = state.Keys.Where(k => !used.Contains(k) && !(model.Runtime.TieWordEmbeddings && k == "lm_head.weight")).ToList();
            if (unused.Count > 0) throw new InvalidDataException($"merged tensors not written to the Hub layout: {string.Join(", ", unused.Take(5))}.");
            foreach (var f in Directory.GetFiles(checkpointDir))
                if (!f.EndsWith(".safetensors", StringComparison.Ordinal)) File.Copy(f, Path.Combine(tmp, Path.GetFileName(f)), overwrite: true);
            Training.Checkpoints.ReplaceDirectory(tmp, full);
        }
        catch
        {
            // A failed merge leaves nothing behind: the half-written temporary folder goes.
            try { Directory.Delete(tmp, true); } catch (IOException) { }
            throw;
        }

        Tensor Get(string runtimeName)
        {
            if (!state.TryGetValue(runtimeName, out var t))
                throw new InvalidDataException($"the checkpoint stores {runtimeName}, which the merged model does not have.");
            used.Add(runtimeName);
            return t;
        }
    }
}
