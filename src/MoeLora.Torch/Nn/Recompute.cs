using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// What the custom autograd functions that run a module again in backward share (<see cref="CheckpointedLayer"/>,
/// <see cref="ExpertRecompute"/>): the forward runs without autograd and keeps the inputs; backward runs the module
/// again with autograd on them and back-propagates the incoming gradient, which fills the module's adapter gradients.
/// </summary>
internal static class Recompute
{
    /// <summary>
    /// The input to give the function: an input without gradient (the first adapted module above frozen ones) still
    /// needs a node, or the module's own adapters would get none, so it becomes a leaf that wants one.
    /// </summary>
    public static Tensor NodeInput(Tensor x) => x.requires_grad ? x : x.detach().requires_grad_(true);

    /// <summary>
    /// Runs <paramref name="run"/> again with autograd on detached copies of the <paramref name="saved"/> inputs,
    /// back-propagates <paramref name="gradOutput"/> through it, and returns each input's gradient: zeros where none
    /// reached an input that wants one, null where <paramref name="needsGrad"/> says it wants none.
    /// </summary>
    public static Tensor?[] Gradients(Tensor gradOutput, IReadOnlyList<Tensor> saved, IReadOnlyList<bool> needsGrad,
        Func<IReadOnlyList<Tensor>, Tensor> run)
    {
        using var _ = enable_grad();
        var inputs = saved.Select((t, i) => t.detach().requires_grad_(needsGrad[i])).ToList();
        var y = run(inputs);
        if (y.requires_grad) y.backward([gradOutput]); // e.g. no routed pair at all (every one went to an identity expert)
        return [.. inputs.Select((t, i) => needsGrad[i] ? t.grad ?? zeros_like(t) : null)];
    }
}
