using TorchSharp;
using static TorchSharp.torch;
using static TorchSharp.torch.autograd;

namespace MoeLora.Torch.Nn;

/// <summary>
/// Gradient checkpointing of one decoder layer, as transformers' <c>gradient_checkpointing_enable()</c> (reentrant
/// <c>torch.utils.checkpoint</c>) does it: the forward runs without autograd and keeps only the layer's input; backward
/// runs the layer again with autograd on that input and back-propagates the incoming gradient through it, which fills
/// the layer's adapter gradients and returns the input's.
/// <para>
/// What a step then keeps per layer is the input (the previous layer's output) and an uninitialised buffer of the
/// output's shape that TorchSharp's custom-function node holds until backward, instead of every intermediate.
/// The layer must be a function of its input and the context alone: a cross-layer hand-over that carries gradients
/// (ZAYA's router state) is refused, and so is LoRA dropout, by <see cref="Models.CausalLm"/> (recomputing would draw
/// new masks).
/// </para>
/// </summary>
internal sealed class CheckpointedLayer : SingleTensorFunction<CheckpointedLayer>
{
    public override string Name => nameof(CheckpointedLayer);

    /// <summary>
    /// What backward needs to run the layer again, kept as context data. The forward's own context does not outlive it
    /// (its masks and inputs belong to the forward's dispose scope), so the recompute gets a fresh one over handles of
    /// the same inputs, taken out of that scope (disposed when backward is done), and builds its masks again.
    /// </summary>
    sealed class Job(IDecoderLayer layer, ForwardContext ctx) : IDisposable
    {
        public IDecoderLayer Layer { get; } = layer;
        readonly Tensor _positions = Keep(ctx.Positions)!, _mask = Keep(ctx.AttentionMask)!;
        readonly Tensor? _ids = Keep(ctx.InputIds), _indexerTopK = Keep(ctx.IndexerTopK);
        readonly ScalarType _dtype = ctx.DType;
        readonly AttentionImplementation _attention = ctx.Attention;
        readonly bool? _plainCausal = ctx.KnownPlainCausal;

        static Tensor? Keep(Tensor? t) => t?.alias().DetachFromDisposeScope();

        /// <summary>The context as the first run saw it (GLM-5's shared layers reuse the indexer selection before them).</summary>
        public ForwardContext Context() => new()
        {
            Positions = _positions, AttentionMask = _mask, InputIds = _ids, DType = _dtype, Attention = _attention,
            IndexerTopK = _indexerTopK, KnownPlainCausal = _plainCausal,
        };

        /// <summary>Backward runs once (no graph is retained): after it the context's handles go.</summary>
        public void Dispose()
        {
            foreach (var t in new[] { _positions, _mask, _ids, _indexerTopK }) t?.Dispose();
        }
    }

    /// <summary>The layer's output; with autograd on, its intermediates are recomputed in backward instead of kept.</summary>
    public static Tensor Run(IDecoderLayer layer, Tensor x, ForwardContext ctx)
    {
        if (!is_grad_enabled() || !(x.requires_grad || HasTrainable(layer))) return layer.Forward(x, ctx);
        var y = apply(Recompute.NodeInput(x), new Job(layer, ctx), ctx);
        // The first run is without autograd, so a state handed to the next layer would carry no gradient.
        if (ctx.RouterState is not null)
            throw new NotSupportedException("gradient checkpointing: this model hands a router state from layer to layer (ZAYA), whose gradient a recomputed layer would lose; run it without --gradient-checkpointing.");
        return y;
    }

    static bool HasTrainable(IDecoderLayer layer) =>
        layer is HfModule m && m.NamedParameters().Any(p => p.Param.requires_grad);

    public override Tensor forward(AutogradContext ctx, params object[] vars)
    {
        var x = (Tensor)vars[0];
        ctx.save_for_backward([x]);
        ctx.save_data("job", vars[1]);
        return ((Job)vars[1]).Layer.Forward(x, (ForwardContext)vars[2]);
    }

    /// <summary>How many layers backward has run again (tests check that checkpointing acted).</summary>
    // Per thread: a CPU backward runs on the thread that calls it, so tests running side by side count only their own.
    [ThreadStatic] internal static long Recomputes;

    public override List<Tensor> backward(AutogradContext ctx, Tensor gradOutput)
    {
        Interlocked.Increment(ref Recomputes);
        var job = (Job)ctx.get_data("job");
        using var scope = NewDisposeScope();
        // The recompute back-propagates through this one layer at once, so its routed experts keep their intermediates
        // here instead of running a third time in their own recompute (ExpertRecompute): one layer's worth, the transient
        // that recompute would have had anyway.
        bool off = ExpertRecompute.Off;
        ExpertRecompute.Off = true;
        Tensor?[] grads;
        try { grads = Recompute.Gradients(gradOutput, ctx.get_saved_variables(), [true], x => job.Layer.Forward(x[0], job.Context())); }
        finally { ExpertRecompute.Off = off; }
        job.Dispose();
        return BackwardHandles.Return(gradOutput, grads[0], null, null);   // one entry per apply() argument; the others are not tensors
    }
}
