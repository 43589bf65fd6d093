using System.Runtime.InteropServices;
using static TorchSharp.torch;

namespace MoeLora.Torch.Models;

/// <summary>
/// <c>THSStorage_data_ptr</c> from the LibTorchSharp TorchSharp already loaded: the base pointer of a tensor's storage
/// for any dtype (TorchSharp's managed <c>storage&lt;T&gt;()</c> has no bfloat16).
/// </summary>
internal static unsafe class NativeStorage
{
    static readonly delegate* unmanaged<IntPtr, IntPtr> Fn = Resolve();

    static delegate* unmanaged<IntPtr, IntPtr> Resolve()
    {
        var lib = Runtime.TorchRuntime.LibTorchSharpHandle();
        return (delegate* unmanaged<IntPtr, IntPtr>)NativeLibrary.GetExport(lib, "THSStorage_data_ptr");
    }

    public static long DataPointer(Tensor t) => (long)Fn(t.Handle);
}
