using TorchSharp;
using static TorchSharp.torch;
using static TorchSharp.torch.autograd;

namespace MoeLora.Torch.Nn;

/// <summary>
/// Routed experts whose intermediates are recomputed in backward instead of kept: the forward runs the grouped
/// experts without autograd and keeps only the block input <c>x</c> [T, H], the routing weights [T, k] and the grouping
/// of the (token, slot) pairs; backward runs them again with autograd on that grouping and back-propagates the incoming
/// gradient, which fills the expert adapters' gradients and returns those of x and of the routing weights.
/// <para>
/// Why: kept, the experts' intermediates are per (token, slot) pair (k of them per token) and, in the padded batched
/// matmul, per padded row: for Qwen3-30B-A3B about 115 KB per token and layer, most of a LoRA step's activations.
/// Recomputed, a layer keeps 2·H values per token (the input and the output buffer TorchSharp's custom-function node
/// holds), and the padded rows live only while one layer's experts run. That makes the padded batched matmul (a few
/// kernels per layer, where one matmul per expert segment launches hundreds) affordable on a GPU at any padding.
/// Recomputing costs one more expert forward per step. Routed experts carry no dropout (PEFT's ParamWrapper refuses
/// it), so the recompute draws nothing random and equals the first run.
/// </para>
/// </summary>
internal sealed class ExpertRecompute : SingleTensorFunction<ExpertRecompute>
{
    public override string Name => nameof(ExpertRecompute);

    /// <summary>
    /// Off: the experts keep their intermediates, on this thread. A checkpointed layer's recompute turns it off (it
    /// back-propagates through one layer at once); tests compare both ways.
    /// </summary>
    [ThreadStatic] internal static bool Off;

    /// <summary>How many expert blocks backward has run again (tests check that the recompute acted).</summary>
    // Per thread: a CPU backward runs on the thread that calls it, so tests running side by side count only their own.
    [ThreadStatic] internal static long Recomputes;

    /// <summary>The experts' computation <c>(x, grouping, topW) → [T, H]</c> and the grouping it runs on, kept for backward.</summary>
    sealed class Job(Func<Tensor, ExpertsBase.Grouping, Tensor, Tensor> run, ExpertsBase.Grouping grouping, bool weightsNeedGrad) : IDisposable
    {
        public Func<Tensor, ExpertsBase.Grouping, Tensor, Tensor> Run { get; } = run;
        // Out of the forward's dispose scope: the graph, not the scope, decides how long the grouping lives. Reusing it
        // spares the recompute the sort and the host reads (device syncs) of the grouping.
        public ExpertsBase.Grouping Grouping { get; } = grouping.Detached();
        public bool WeightsNeedGrad { get; } = weightsNeedGrad;

        /// <summary>Backward runs once (no graph is retained): after it the grouping goes.</summary>
        public void Dispose() => Grouping.Dispose();
    }

    /// <summary>
    /// <paramref name="run"/>(x, grouping, topW), recomputed in backward when autograd records it; run as it is when
    /// nothing needs a gradient (inference, a frozen block below every adapter) or while <see cref="Off"/>.
    /// </summary>
    public static Tensor Run(ExpertsBase experts, Tensor x, ExpertsBase.Grouping grouping, Tensor topW, Func<Tensor, ExpertsBase.Grouping, Tensor, Tensor> run)
    {
        if (Off || !is_grad_enabled() || !(x.requires_grad || topW.requires_grad || HasTrainable(experts))) return run(x, grouping, topW);
        return apply(Recompute.NodeInput(x), topW, new Job(run, grouping, topW.requires_grad));
    }

    static bool HasTrainable(ExpertsBase experts) => experts.HasEnabledDeltas || experts.NamedParameters().Any(p => p.Param.requires_grad);

    public override Tensor forward(AutogradContext ctx, params object[] vars)
    {
        Tensor x = (Tensor)vars[0], topW = (Tensor)vars[1];
        var job = (Job)vars[2];
        ctx.save_for_backward([x, topW]);
        ctx.save_data("job", job);
        // The padded rows and every other intermediate go as soon as the output exists.
        using var scope = NewDisposeScope();
        return job.Run(x, job.Grouping, topW).MoveToOuterDisposeScope();
    }

    public override List<Tensor> backward(AutogradContext ctx, Tensor gradOutput)
    {
        Interlocked.Increment(ref Recomputes);
        var job = (Job)ctx.get_data("job");
        using var scope = NewDisposeScope();
        var grads = Recompute.Gradients(gradOutput, ctx.get_saved_variables(), [true, job.WeightsNeedGrad],
            i => job.Run(i[0], job.Grouping, i[1]));
        job.Dispose();
        // One entry per apply() argument: x, the routing weights (none when they need no gradient), the job.
        return BackwardHandles.Return(gradOutput, grads[0], grads[1], null);
    }
}
