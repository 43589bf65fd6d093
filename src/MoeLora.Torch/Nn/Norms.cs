using MoeLora.Core.Architectures.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>A norm module over the last dimension.</summary>
public interface INorm
{
    Tensor Forward(Tensor x);
}

/// <summary>
/// LayerNorm as the families compute it: torch's nn.LayerNorm with weight and bias (PhiMoE), or Cohere's bias-free
/// LayerNorm (mean and variance in fp32, times the weight in fp32, cast back last).
/// </summary>
public sealed class LayerNorm : HfModule, INorm
{
    public Parameter weight { get; }
    public Parameter? bias { get; }
    readonly double _eps;

    public LayerNorm(long size, double eps, bool hasBias, Init init)
    {
        _eps = eps;
        weight = AddParameter("weight", init.Ones(size));
        if (hasBias) bias = AddParameter("bias", init.Zeros(size));
    }

    public Tensor Forward(Tensor x)
    {
        if (bias is not null) return nn.functional.layer_norm(x, [x.shape[^1]], weight, bias, _eps);
        var h = x.to(ScalarType.Float32);
        var mean = h.mean([-1], keepdim: true);
        var centred = h - mean;
        var v = centred.pow(2).mean([-1], keepdim: true);
        return (weight.to(ScalarType.Float32) * (centred * rsqrt(v + _eps))).to(x.dtype);
    }
}

public static class Norms
{
    /// <summary>The norm module of <paramref name="s"/> over <paramref name="size"/> features.</summary>
    public static HfModule Create(long size, NormSettings s, Init init) => s.Kind switch
    {
        NormKind.Rms or NormKind.RmsWeightInFp32 or NormKind.RmsOnePlusWeight => new RmsNorm(size, s, init),
        NormKind.LayerNorm => new LayerNorm(size, s.Eps, hasBias: true, init),
        NormKind.LayerNormNoBias => new LayerNorm(size, s.Eps, hasBias: false, init),
        _ => throw new NotSupportedException($"norm kind {s.Kind} has no runtime block."),
    };
}

/// <summary>
/// A decoder layer of a <see cref="LayerForm"/>: optional norms before/after attention and feed-forward, a residual
/// multiplier or learned per-channel residual scales, a parallel (attention + feed-forward on one normed input) variant and an optional second feed-forward
/// summed with the first; children registered in the form's order.
/// </summary>
public sealed class FormDecoderLayer : HfModule, IDecoderLayer
{
    readonly IBlock? _attn, _ff;
    readonly IBlock? _extra;
    readonly INorm? _beforeAttn, _afterAttn, _beforeFf, _afterFf;
    readonly LayerForm _form;
    readonly Parameter? _attnScale, _ffScale;

    /// <param name="attn">The attention (or other mixer) under <see cref="LayerForm.AttentionName"/>; null: the layer has none.</param>
    /// <param name="ff">The feed-forward; null: the layer has none (at most one of the two is null).</param>
    public FormDecoderLayer(HfModule? attn, string ffName, HfModule? ff, LayerForm form, HfModule? extraFf, long hidden, Init init)
    {
        _form = form;
        if (form.ResidualScales is { } rs)
        {
            _attnScale = AddParameter(rs.Attention, init.Ones(hidden));
            _ffScale = AddParameter(rs.FeedForward, init.Ones(hidden));
        }
        var children = new Dictionary<string, HfModule>(StringComparer.Ordinal);
        if (attn is not null) children.Add(form.AttentionName, attn);
        if (ff is not null) children.Add(ffName, ff);
        INorm? Norm(NamedNorm? n)
        {
            if (n is null) return null;
            var m = Norms.Create(hidden, n.Norm, init);
            children.Add(n.Name, m);
            return (INorm)m;
        }
        _beforeAttn = Norm(form.BeforeAttention);
        _afterAttn = Norm(form.AfterAttention);
        _beforeFf = Norm(form.BeforeFeedForward);
        _afterFf = Norm(form.AfterFeedForward);
        if (extraFf is not null) children.Add(form.ExtraFeedForwardName ?? throw new InvalidDataException("an extra feed-forward needs a name."), extraFf);
        if (form.Order.Count != children.Count || !form.Order.All(children.ContainsKey))
            throw new InvalidDataException($"layer order [{string.Join(", ", form.Order)}] does not name its children [{string.Join(", ", children.Keys)}].");
        if (attn is null && ff is null) throw new InvalidDataException("a layer needs attention or a feed-forward.");
        // A one-sublayer block (Nemotron-H) is x + sublayer(norm(x)): no residual multiplier, scales or parallel form.
        if ((attn is null || ff is null) && (form.ResidualMultiplier != 1.0 || form.ResidualScales is not null || form.Parallel || extraFf is not null))
            throw new InvalidDataException("a one-sublayer layer takes no residual multiplier, residual scales, parallel form or extra feed-forward.");
        // A dotted name nests its child in a parameter-free container (DBRX's norm_attn_norm.{norm_1, attn, norm_2}).
        var groups = new Dictionary<string, Container>(StringComparer.Ordinal);
        foreach (var name in form.Order)
        {
            var dot = name.IndexOf('.', StringComparison.Ordinal);
            if (dot < 0) { AddChild(name, children[name]); continue; }
            if (!groups.TryGetValue(name[..dot], out var group)) groups[name[..dot]] = group = AddChild(name[..dot], new Container());
            group.Add(name[(dot + 1)..], children[name]);
        }
        _attn = (IBlock?)attn;
        _ff = (IBlock?)ff;
        _extra = (IBlock?)extraFf;
    }

    static Tensor Apply(INorm? n, Tensor x) => n is null ? x : n.Forward(x);

    Tensor FeedForward(Tensor x, ForwardContext ctx) => _extra is null ? _ff!.Forward(x, ctx) : _ff!.Forward(x, ctx) + _extra.Forward(x, ctx);

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        // One-sublayer blocks (Nemotron-H): x + mixer(norm(x)).
        if (_ff is null) return x + Apply(_afterAttn, _attn!.Forward(Apply(_beforeAttn, x), ctx));
        if (_attn is null) return x + Apply(_afterFf, FeedForward(Apply(_beforeFf, x), ctx));
        double m = _form.ResidualMultiplier;
        if (_form.Parallel)
        {
            var normed = Apply(_beforeAttn, x);
            return x + _attn.Forward(normed, ctx) + FeedForward(normed, ctx);
        }
        var a = Apply(_afterAttn, _attn.Forward(Apply(_beforeAttn, x), ctx));
        var h = (_attnScale is null ? x : _attnScale * x) + (m == 1.0 ? a : a * m);
        var f = Apply(_afterFf, FeedForward(Apply(_beforeFf, h), ctx));
        return (_ffScale is null ? h : _ffScale * h) + (m == 1.0 ? f : f * m);
    }
}
