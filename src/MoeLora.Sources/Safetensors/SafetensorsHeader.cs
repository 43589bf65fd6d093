namespace MoeLora.Sources.Safetensors;

/// <summary>One tensor described by a safetensors header.</summary>
/// <param name="Name">Name as stored in the file (checkpoint name, not necessarily the runtime name).</param>
/// <param name="DataBegin">Start of the data, relative to the end of the header.</param>
/// <param name="DataEnd">End (exclusive) of the data, relative to the end of the header.</param>
public sealed record SafetensorsTensor(string Name, SafetensorsDtype Dtype, IReadOnlyList<long> Shape, long DataBegin, long DataEnd)
{
    /// <summary>Number of elements: the product of the shape (1 for a scalar).</summary>
    public long ElementCount
    {
        get
        {
            long count = 1;
            foreach (long dim in Shape) count *= dim;
            return count;
        }
    }

    /// <summary>Bytes the tensor occupies in the file.</summary>
    public long ByteCount => DataEnd - DataBegin;

    public override string ToString() => $"{Name} {Dtype.Code()} [{string.Join(", ", Shape)}]";
}

/// <summary>The validated header of one safetensors file.</summary>
/// <param name="Tensors">Tensors in data-offset order.</param>
/// <param name="Metadata">The optional <c>__metadata__</c> string map (empty when absent).</param>
/// <param name="HeaderLength">Length of the JSON header in bytes (the leading 8-byte number).</param>
/// <param name="DataLength">Length of the data section: the end of the last tensor.</param>
public sealed record SafetensorsHeader(
    IReadOnlyList<SafetensorsTensor> Tensors,
    IReadOnlyDictionary<string, string> Metadata,
    long HeaderLength,
    long DataLength)
{
    /// <summary>Size of the whole file: 8 + header + data.</summary>
    public long FileSize => 8 + HeaderLength + DataLength;

    /// <summary>The largest header the reader accepts, as in the safetensors reference implementation.</summary>
    public const long MaxHeaderLength = 100_000_000;
}
