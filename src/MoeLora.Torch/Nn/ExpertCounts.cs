using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// How many (token, slot) pairs the router sent to each expert, counted with <c>scatter_add</c>. Not
/// <c>bincount</c>: on CUDA it reads its input's min and max back to the host first, two synchronisations that stall
/// the host until the device has caught up, in every MoE layer of every forward and checkpoint recompute.
/// </summary>
public static class ExpertCounts
{
    /// <summary>
    /// [<paramref name="size"/>] int64 counts of each id in <paramref name="ids"/>, on its device, computed without
    /// gradients. Every id must be below <paramref name="size"/> (identity experts included where a layer has them).
    /// </summary>
    public static Tensor OnDevice(Tensor ids, long size)
    {
        using var _ = no_grad();
        var flat = ids.flatten();
        return zeros(size, ScalarType.Int64, flat.device).scatter_add_(0, flat, ones_like(flat, ScalarType.Int64));
    }

    /// <summary>The same counts, read to the host (one synchronisation), for loops that skip experts with no pairs.</summary>
    public static long[] Read(Tensor ids, long size)
    {
        using var counts = OnDevice(ids, size);
        return counts.data<long>().ToArray();
    }
}
