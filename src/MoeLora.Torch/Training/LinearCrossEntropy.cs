using MoeLora.Core.Memory;
using TorchSharp;
using static TorchSharp.torch;
using static TorchSharp.torch.autograd;

namespace MoeLora.Torch.Training;

/// <summary>
/// <c>F.cross_entropy((h @ Wᵀ + b)·m).float(), labels, ignore_index=-100)</c> for a frozen LM head, computed a chunk
/// of rows at a time (<see cref="ChunkedLmLoss"/>): forward keeps only <c>h</c> and the labels, and backward computes
/// each chunk's logits again to form its gradient. Per row this is what autograd does through transformers'
/// <c>ForCausalLMLoss</c>: the head in the model dtype, the multiplier in that dtype, log-softmax in fp32, and a
/// gradient of <c>(softmax − onehot)·g/n</c> cast back to the model dtype before the head's matmul.
/// </summary>
internal sealed class LinearCrossEntropy : SingleTensorFunction<LinearCrossEntropy>
{
    public override string Name => nameof(LinearCrossEntropy);

    /// <summary>The frozen head and how rows are grouped; kept as context data (the weight lives with the model).</summary>
    internal sealed record Head(Tensor Weight, Tensor? Bias, double Multiplier, long ChunkTokens);

    /// <summary>Mean cross-entropy of <paramref name="hidden"/> [N, H] against <paramref name="labels"/> [N] (-100 ignored).</summary>
    public static Tensor Apply(Tensor hidden, Tensor labels, Head head) => apply(hidden, labels, head);

    public override Tensor forward(AutogradContext ctx, params object[] vars)
    {
        var h = (Tensor)vars[0];
        var labels = (Tensor)vars[1];
        var head = (Head)vars[2];
        ctx.save_for_backward([h, labels]);
        ctx.save_data("head", head);
        using var scope = NewDisposeScope();
        var total = zeros([], ScalarType.Float32, h.device);
        foreach (var (start, length) in Chunks(h.shape[0], head.ChunkTokens))
        {
            using var chunk = NewDisposeScope();
            var (valid, index) = Targets(labels.narrow(0, start, length));
            using var logSoftmax = LogSoftmax(h.narrow(0, start, length), head);
            var picked = logSoftmax.gather(1, index).squeeze(1);
            total.sub_(picked.masked_fill(valid.logical_not(), 0).sum());
        }
        return total.div(labels.ne(-100).sum().to(ScalarType.Float32)).MoveToOuterDisposeScope();
    }

    public override List<Tensor> backward(AutogradContext ctx, Tensor gradOutput)
    {
        var head = (Head)ctx.get_data("head");
        using var scope = NewDisposeScope();
        var saved = ctx.get_saved_variables();
        Tensor h = saved[0], labels = saved[1];
        // nll_loss's mean: every counted row's target gets -g/n; log_softmax's backward turns that into p·g/n − g/n at
        // the target and p·g/n elsewhere (p = exp of the saved log-softmax), zero on ignored rows.
        var scale = gradOutput.to(ScalarType.Float32).div(labels.ne(-100).sum().to(ScalarType.Float32));
        var gradH = empty_like(h);
        foreach (var (start, length) in Chunks(h.shape[0], head.ChunkTokens))
        {
            using var chunk = NewDisposeScope();
            var (valid, index) = Targets(labels.narrow(0, start, length));
            var rowScale = valid.to(ScalarType.Float32).mul(scale).unsqueeze(1);
            Tensor grad16;
            using (var p = LogSoftmax(h.narrow(0, start, length), head))
            {
                p.exp_().mul_(rowScale);
                p.scatter_add_(1, index, rowScale.neg());
                grad16 = p.to(h.dtype);
            }
            if (head.Multiplier != 1.0) grad16 = grad16.mul(head.Multiplier);
            gradH.narrow(0, start, length).copy_(grad16.mm(head.Weight));
        }
        return Nn.BackwardHandles.Return(gradOutput, gradH, null, null);   // one entry per apply() argument: labels and the head get none
    }

    /// <summary>log_softmax((h·Wᵀ + b)·m in the model dtype, widened to fp32), freeing each narrower tensor once its wider copy exists.</summary>
    static Tensor LogSoftmax(Tensor h, Head head)
    {
        var logits = nn.functional.linear(h, head.Weight, head.Bias);
        if (head.Multiplier != 1.0)
        {
            var scaled = logits.mul(head.Multiplier);
            logits.Dispose();
            logits = scaled;
        }
        using var wide = logits.to(ScalarType.Float32);
        logits.Dispose();
        return wide.log_softmax(-1);
    }

    /// <summary>Which rows count (label not -100), and each row's target as a [c, 1] gather index (0 on ignored rows).</summary>
    static (Tensor Valid, Tensor Index) Targets(Tensor labels)
    {
        var valid = labels.ne(-100);
        return (valid, labels.masked_fill(valid.logical_not(), 0).unsqueeze(1));
    }

    static IEnumerable<(long Start, long Length)> Chunks(long rows, long chunk)
    {
        for (long start = 0; start < rows; start += chunk) yield return (start, Math.Min(chunk, rows - start));
    }
}
