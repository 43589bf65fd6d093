using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// The tensor handles a custom autograd function's backward leaves behind, released as soon as they are no longer
/// needed instead of when .NET finalises them.
/// <para>
/// Why: TorchSharp wraps each incoming gradient in a new handle, and backward runs on autograd's thread, where no
/// dispose scope owns it; and it copies the gradients backward returns into the graph only after backward has returned,
/// so their handles cannot be disposed in backward either. Left to the finaliser, both keep their device memory alive:
/// on a Qwen3-30B-A3B LoRA step about a gigabyte of layer-sized gradients by the end of backward, and more as steps
/// follow (measured on an H200 as device memory growing step after step). So each backward disposes its incoming
/// gradient when done and hands what it returns to <see cref="Return"/>; those handles are disposed when the next
/// backward on the same thread returns (the graph copied them as soon as theirs returned, and a backward nested in
/// another returns before it), and by <see cref="Release"/> once a step's backward is done.
/// </para>
/// </summary>
internal static class BackwardHandles
{
    // Per thread: a CUDA device's backward runs on that device's one autograd thread, a CPU backward on its caller's.
    [ThreadStatic] static List<Tensor>? _returned;

    /// <summary>The gradients to return from backward, one per apply() argument (null where none).</summary>
    public static List<Tensor> Return(Tensor gradOutput, params Tensor?[] grads)
    {
        gradOutput.Dispose();
        Release();
        var list = _returned ??= [];
        foreach (var g in grads)
            if (g is not null) list.Add(g.DetachFromDisposeScope());
        return [.. grads.Select(g => g!)];
    }

    /// <summary>Disposes the handles earlier backwards on this thread returned (call after a step's backward).</summary>
    public static void Release()
    {
        if (_returned is not { Count: > 0 } list) return;
        foreach (var t in list) t.Dispose();
        list.Clear();
    }
}
