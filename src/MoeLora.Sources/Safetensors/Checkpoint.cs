namespace MoeLora.Sources.Safetensors;

/// <summary>One safetensors file of a checkpoint and its header.</summary>
/// <param name="Name">File name relative to the model folder, e.g. <c>model-00001-of-00002.safetensors</c>.</param>
public sealed record CheckpointFile(string Name, SafetensorsHeader Header);

/// <summary>One tensor of a checkpoint, with the file that holds it.</summary>
public sealed record CheckpointTensor(SafetensorsTensor Tensor, string File)
{
    public string Name => Tensor.Name;
}

/// <summary>Parameters and bytes of one dtype in a checkpoint.</summary>
public sealed record DtypeTotal(SafetensorsDtype Dtype, long Elements, long Bytes);

/// <summary>
/// The headers of a whole safetensors checkpoint (one file, or the shards of an index), merged. Names are the
/// checkpoint's own, which for MoE models in transformers 5 differ from runtime parameter names.
/// </summary>
public sealed class Checkpoint
{
    private readonly Dictionary<string, CheckpointTensor> _byName;

    public Checkpoint(IReadOnlyList<CheckpointFile> files, CheckpointIndex? index, string location)
    {
        Files = files;
        Index = index;
        Location = location;
        _byName = new Dictionary<string, CheckpointTensor>(StringComparer.Ordinal);
        foreach (CheckpointFile file in files)
        {
            foreach (SafetensorsTensor tensor in file.Header.Tensors)
            {
                if (!_byName.TryAdd(tensor.Name, new CheckpointTensor(tensor, file.Name)))
                    throw new SafetensorsFormatException(
                        $"{location}: tensor '{tensor.Name}' is stored in both {_byName[tensor.Name].File} and {file.Name}.");
            }
        }
        Tensors = files.SelectMany(f => f.Header.Tensors.Select(t => _byName[t.Name])).ToList();
    }

    /// <summary>Folder or Hub address the checkpoint was read from.</summary>
    public string Location { get; }

    public IReadOnlyList<CheckpointFile> Files { get; }

    /// <summary>The index of a sharded checkpoint, or null for a single file.</summary>
    public CheckpointIndex? Index { get; }

    /// <summary>Every tensor, file by file in offset order.</summary>
    public IReadOnlyList<CheckpointTensor> Tensors { get; }

    public CheckpointTensor? Find(string name) => _byName.GetValueOrDefault(name);

    /// <summary>Bytes on disk of all files, headers included.</summary>
    public long SizeOnDisk => Files.Sum(f => f.Header.FileSize);

    /// <summary>Bytes of tensor data (what the index's <c>total_size</c> counts).</summary>
    public long DataSize => Files.Sum(f => f.Header.DataLength);

    public long ElementCount => Tensors.Sum(t => t.Tensor.ElementCount);

    /// <summary>Elements and bytes per dtype, largest first: the checkpoint's real storage types.</summary>
    public IReadOnlyList<DtypeTotal> DtypeTotals =>
        Tensors.GroupBy(t => t.Tensor.Dtype)
            .Select(g => new DtypeTotal(g.Key, g.Sum(t => t.Tensor.ElementCount), g.Sum(t => t.Tensor.ByteCount)))
            .OrderByDescending(t => t.Bytes)
            .ToList();
}
