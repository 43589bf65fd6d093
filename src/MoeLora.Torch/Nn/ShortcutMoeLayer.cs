using MoeLora.Core.Architectures.Runtime;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// LongCat-Flash's decoder layer (<see cref="ShortcutMoeForm"/>, transformers' <c>LongcatFlashDecoderLayer.forward</c>):
/// two pre-norm attention + dense-MLP pairs, and the shortcut MoE on the first pair's post-attention normed input,
/// added after the second MLP. Children registered as transformers does: mlp (the MoE), self_attn.{0,1}, mlps.{0,1},
/// input_layernorm.{0,1}, post_attention_layernorm.{0,1}.
/// </summary>
public sealed class ShortcutMoeDecoderLayer : HfModule, IDecoderLayer
{
    readonly IBlock _moe;
    readonly IBlock[] _attn, _mlp;
    readonly INorm[] _inputNorm, _postNorm;

    /// <param name="attention">Builds one attention sublayer (called twice: each has its own weights).</param>
    /// <param name="denseMlp">Builds one dense MLP (called twice).</param>
    public ShortcutMoeDecoderLayer(string moeName, HfModule moe, Func<HfModule> attention, Func<HfModule> denseMlp, ShortcutMoeForm form,
        NormSettings inputNorm, NormSettings postNorm, long hidden, Init init)
    {
        _moe = (IBlock)AddChild(moeName, moe);
        _attn = Pair<IBlock>("self_attn", attention);
        _mlp = Pair<IBlock>(form.DenseName, denseMlp);
        _inputNorm = Pair<INorm>("input_layernorm", () => Norms.Create(hidden, inputNorm, init));
        _postNorm = Pair<INorm>("post_attention_layernorm", () => Norms.Create(hidden, postNorm, init));
    }

    // An nn.ModuleList of two, built in index order.
    T[] Pair<T>(string name, Func<HfModule> make)
    {
        var list = AddChild(name, new Container());
        return [(T)(object)list.Add("0", make()), (T)(object)list.Add("1", make())];
    }

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        var h = x + _attn[0].Forward(_inputNorm[0].Forward(x), ctx);
        var normed = _postNorm[0].Forward(h);
        var shortcut = _moe.Forward(normed, ctx);
        h = h + _mlp[0].Forward(normed, ctx);
        h = h + _attn[1].Forward(_inputNorm[1].Forward(h), ctx);
        return h + _mlp[1].Forward(_postNorm[1].Forward(h), ctx) + shortcut;
    }
}
