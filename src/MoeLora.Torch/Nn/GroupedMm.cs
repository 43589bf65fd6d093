using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// libtorch's grouped matrix product <c>torch._grouped_mm(x, w, offs)</c>: rows [n, K] sorted by group, one weight
/// [G, K, N] per group, <c>offs</c> the groups' cumulative row ends (int32) → [n, N], with autograd. transformers runs its
/// fused experts with it by default ("grouped_mm"); on Hopper and Blackwell GPUs in bf16 it is one CUTLASS kernel for
/// all experts, with no padding and no host read of the counts.
/// <para>
/// TorchSharp 0.107 binds no such function, so it is reached through a TorchScript compilation unit
/// (<c>torch.jit.compile</c>), which calls the operator through the dispatcher like any other: its backward is
/// libtorch's own. A libtorch without the operator fails that compilation, and the experts keep to their padded
/// batched matmuls (<see cref="ExpertCapacity"/>).
/// </para>
/// </summary>
internal static class GroupedMm
{
    static readonly Lazy<torch.jit.CompilationUnit?> Unit = Runtime.TorchScriptUnit.Lazy(
        "def grouped_mm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:\n    return torch._grouped_mm(x, w, offs=offs)\n",
        "MOELORA_GROUPED_MM");

    /// <summary>Whether this libtorch has the operator (and <c>MOELORA_GROUPED_MM=0</c> does not turn it off).</summary>
    public static bool Available => Unit.Value is not null;

    /// <summary>x [n, K] · w[g] for the rows of each group g → [n, N].</summary>
    public static Tensor Run(Tensor x, Tensor w, Tensor offsets)
    {
        Calls++;
        return (Tensor)Unit.Value!.invoke("grouped_mm", x, w, offsets);
    }

    /// <summary>How many grouped matmuls ran on this thread (tests check which path a forward took).</summary>
    [ThreadStatic] internal static long Calls;

    static readonly System.Collections.Concurrent.ConcurrentDictionary<long, bool> FastCuda = new();

    /// <summary>
    /// Whether experts of <paramref name="dtype"/> on <paramref name="device"/> should run on it: on the CPU always
    /// (libtorch loops over the groups in C++); on CUDA in bf16 on compute capability 9 or 10 only, libtorch's CUTLASS
    /// path (elsewhere it copies the offsets to the host and loops, slower than the padded batched matmuls).
    /// <paramref name="widths"/> are every K and N the experts will multiply: libtorch wants rows of a multiple of 16
    /// bytes on every device (8 bf16 values, 4 fp32 ones).
    /// </summary>
    public static bool Suits(Device device, ScalarType dtype, IEnumerable<long> widths)
    {
        if (!Available) return false;
        long perRow = 16 / ElementSize(dtype);
        if (perRow == 0 || !widths.All(w => w % perRow == 0)) return false;
        if (device.type == DeviceType.CPU) return true;
        if (device.type != DeviceType.CUDA || dtype != ScalarType.BFloat16) return false;
        int index = Math.Max(0, (int)device.index);
        return FastCuda.GetOrAdd(index, i => Runtime.DeviceMemory.ComputeCapabilityMajor((int)i) is 9 or 10);
    }

    static long ElementSize(ScalarType dtype) => dtype switch
    {
        ScalarType.Float64 or ScalarType.Int64 => 8,
        ScalarType.Float32 or ScalarType.Int32 => 4,
        ScalarType.BFloat16 or ScalarType.Float16 or ScalarType.Int16 => 2,
        _ => 1,
    };
}
