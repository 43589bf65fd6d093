using MoeLora.Sources.Progress;

namespace MoeLora.Sources.Safetensors;

/// <summary>
/// Finds a safetensors checkpoint in a model folder and reads the headers of all its files, never the weights:
/// <c>model.safetensors</c> if present, else the shards named by <c>model.safetensors.index.json</c>.
/// </summary>
public static class CheckpointReader
{
    public const string SingleFileName = "model.safetensors";

    // Shard headers are independent requests; a few at a time keeps large checkpoints quick without flooding a server.
    private const int Parallelism = 4;

    /// <summary>Returns the checkpoint's headers, or null when the folder holds no safetensors checkpoint.</summary>
    public static async Task<Checkpoint?> TryReadAsync(
        ICheckpointStore store,
        int probeBytes = SafetensorsReader.DefaultProbeBytes,
        IDownloadProgress? progress = null,
        CancellationToken cancellationToken = default)
    {
        if (await store.TryOpenAsync(SingleFileName, cancellationToken) is { } single)
        {
            SafetensorsHeader header = await SafetensorsReader.ReadHeaderAsync(single, probeBytes, cancellationToken);
            return new Checkpoint([new CheckpointFile(SingleFileName, header)], null, store.Location);
        }

        string? indexJson = await store.TryReadTextAsync(CheckpointIndex.FileName, cancellationToken);
        if (indexJson is null) return null;
        CheckpointIndex index = CheckpointIndex.Parse(indexJson, $"{store.Location}/{CheckpointIndex.FileName}");

        IReadOnlyList<string> shards = index.Shards;
        var headers = new SafetensorsHeader[shards.Count];
        using IProgressBar bar = (progress ?? NullDownloadProgress.Instance).Start($"{store.Location}: {shards.Count} shard headers", shards.Count);
        await Parallel.ForEachAsync(
            Enumerable.Range(0, shards.Count),
            new ParallelOptions { MaxDegreeOfParallelism = Parallelism, CancellationToken = cancellationToken },
            async (i, ct) =>
            {
                IRangeSource source = await store.TryOpenAsync(shards[i], ct)
                    ?? throw new SafetensorsFormatException($"{store.Location}/{CheckpointIndex.FileName} names shard {shards[i]}, which does not exist.");
                headers[i] = await SafetensorsReader.ReadHeaderAsync(source, probeBytes, ct);
                bar.Advance(1);
            });

        var files = shards.Select((name, i) => new CheckpointFile(name, headers[i])).ToList();
        var checkpoint = new Checkpoint(files, index, store.Location);
        CheckAgainstIndex(checkpoint, index, store.Location);
        return checkpoint;
    }

    // The index and the shards must agree exactly; anything else means a broken or half-uploaded checkpoint.
    private static void CheckAgainstIndex(Checkpoint checkpoint, CheckpointIndex index, string location)
    {
        foreach ((string tensor, string shard) in index.WeightMap)
        {
            CheckpointTensor? found = checkpoint.Find(tensor);
            if (found is null)
                throw new SafetensorsFormatException($"{location}: the index puts tensor '{tensor}' in {shard}, but that shard does not contain it.");
            if (found.File != shard)
                throw new SafetensorsFormatException($"{location}: the index puts tensor '{tensor}' in {shard}, but it is in {found.File}.");
        }
        foreach (CheckpointTensor tensor in checkpoint.Tensors)
        {
            if (!index.WeightMap.ContainsKey(tensor.Name))
                throw new SafetensorsFormatException($"{location}: {tensor.File} contains tensor '{tensor.Name}', which the index does not list.");
        }
    }
}
