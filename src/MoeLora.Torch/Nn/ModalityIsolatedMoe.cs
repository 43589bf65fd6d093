using MoeLora.Core.Architectures.Runtime;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// ERNIE 4.5 VL's modality-isolated MoE block (<see cref="ModalityIsolatedMoeSettings"/>), run on text: the text and
/// vision sparse blocks are <see cref="RoutedMoe"/> blocks without a shared expert, registered in that order, then the
/// shared expert. Text input has no vision tokens, so transformers runs only the text block on every token; the vision
/// block is built (its parameters load, save and take adapters) but never run, and gets no gradient.
/// </summary>
public sealed class ModalityIsolatedMoe : HfModule, IBlock
{
    readonly RoutedMoe _text;
    readonly GatedMlp? _shared;

    public ModalityIsolatedMoe(long hidden, ModalityIsolatedMoeSettings s, Init init)
    {
        if (s.Text.Shared is not null || s.Vision.Shared is not null)
            throw new NotSupportedException("the modality blocks of an isolated MoE hold no shared expert of their own.");
        _text = AddChild(s.TextName, new RoutedMoe(hidden, s.Text, init));
        AddChild(s.VisionName, new RoutedMoe(hidden, s.Vision, init));
        if (s.Shared is { } sh)
        {
            if (sh.SigmoidGateName is not null || sh.FusedGateUp || sh.ClampLimit is not null)
                throw new NotSupportedException("an isolated MoE runs a plain shared expert only.");
            _shared = AddChild(sh.Name, new GatedMlp(hidden, sh.Intermediate, sh.Act, init, sh.Bias, sh.ActName));
        }
    }

    /// <summary>text block(x) + shared(x); the text block records its router logits ([T, E]) as transformers returns them.</summary>
    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var routed = _text.Forward(x, ctx);
        return _shared is null ? routed : routed + _shared.Forward(x);
    }
}
