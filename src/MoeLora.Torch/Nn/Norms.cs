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

/// <summary>
/// A.X-K2's AXK2GatedRMSNorm: <c>y = norm(x)</c>, then <c>y · sigmoid(mlp(y))</c> with the sigmoid taken in fp32 and the
/// product cast back to y's dtype; mlp is AXK2GateMLP, <c>fc2(SiLU(fc1(y)))</c> through a low rank, no biases.
/// </summary>
public sealed class GatedRmsNorm : HfModule, INorm
{
    readonly RmsNorm _norm;
    readonly GateMlp _mlp;

    public GatedRmsNorm(long size, NormSettings s, Init init)
    {
        if (s.GateRank <= 0) throw new InvalidDataException("a gated RMSNorm needs a positive gate rank.");
        _norm = AddChild("norm", new RmsNorm(size, s.Eps, init));
        _mlp = AddChild("mlp", new GateMlp(size, s.GateRank, init));
    }

    public Tensor Forward(Tensor x)
    {
        var y = _norm.Forward(x);
        return (y * nn.functional.sigmoid(_mlp.Forward(y).to(ScalarType.Float32))).to(y.dtype);
    }

    /// <summary>AXK2GateMLP (a CLIPMLP): activation_fn (SiLU), fc1 [rank, H], fc2 [H, rank], registered in that order.</summary>
    sealed class GateMlp : HfModule
    {
        readonly Activation _act;
        readonly Linear _fc1, _fc2;

        public GateMlp(long size, long rank, Init init)
        {
            _act = AddChild("activation_fn", new Activation("silu"));
            _fc1 = AddChild("fc1", new Linear(size, rank, false, init));
            _fc2 = AddChild("fc2", new Linear(rank, size, false, init));
        }

        public Tensor Forward(Tensor y) => _fc2.Forward(_act.Forward(_fc1.Forward(y)));
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
        NormKind.GatedRms => new GatedRmsNorm(size, s, init),
        _ => throw new NotSupportedException($"norm kind {s.Kind} has no runtime block."),
    };
}

/// <summary>
/// A decoder layer of a <see cref="LayerForm"/>: optional norms before/after attention and feed-forward, a residual
/// multiplier, learned per-channel residual scales or MiniMax's normed residuals, a parallel (attention + feed-forward on one normed input) variant and an optional second feed-forward
/// summed with the first; children registered in the form's order.
/// </summary>
public sealed class FormDecoderLayer : HfModule, IDecoderLayer
{
    readonly IBlock? _attn, _ff;
    readonly IBlock? _extra;
    readonly INorm? _beforeAttn, _afterAttn, _beforeFf, _afterFf;
    readonly LayerForm _form;
    readonly Parameter? _attnScale, _ffScale;
    readonly AffineResidual? _attnAffine, _ffAffine;

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
        if (form.AffineResiduals is { } ar)
        {
            children.Add(ar.Attention, _attnAffine = new AffineResidual(hidden, init));
            children.Add(ar.FeedForward, _ffAffine = new AffineResidual(hidden, init));
        }
        if (extraFf is not null) children.Add(form.ExtraFeedForwardName ?? throw new InvalidDataException("an extra feed-forward needs a name."), extraFf);
        if (form.Order.Count != children.Count || !form.Order.All(children.ContainsKey))
            throw new InvalidDataException($"layer order [{string.Join(", ", form.Order)}] does not name its children [{string.Join(", ", children.Keys)}].");
        if (attn is null && ff is null) throw new InvalidDataException("a layer needs attention or a feed-forward.");
        // A one-sublayer block (Nemotron-H) is x + sublayer(norm(x)): no residual multiplier, scales or parallel form.
        if ((attn is null || ff is null) && (form.ResidualMultiplier != 1.0 || form.ResidualScales is not null || form.AffineResiduals is not null
                || form.Parallel || extraFf is not null))
            throw new InvalidDataException("a one-sublayer layer takes no residual multiplier, residual scales, parallel form or extra feed-forward.");
        if (form.NormedResiduals is not null && (form.ResidualMultiplier != 1.0 || form.ResidualScales is not null || form.AffineResiduals is not null
                || form.Parallel || extraFf is not null || form.AfterAttention is not null || form.AfterFeedForward is not null))
            throw new InvalidDataException("normed residuals take only the norms before attention and feed-forward.");
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

    // A norm reads the residual in the model's dtype (ZAYA keeps its residual stream in fp32 and casts it for each norm).
    static Tensor Apply(INorm? n, Tensor x) => n is null ? x : n.Forward(x);
    static Tensor Apply(INorm? n, Tensor x, ForwardContext ctx) => n is null ? x : n.Forward(x.dtype == ctx.DType ? x : x.to(ctx.DType));

    Tensor FeedForward(Tensor x, ForwardContext ctx) => _extra is null ? _ff!.Forward(x, ctx) : _ff!.Forward(x, ctx) + _extra.Forward(x, ctx);

    public Tensor Forward(Tensor x, ForwardContext ctx)
    {
        // One-sublayer blocks (Nemotron-H): x + mixer(norm(x)).
        if (_ff is null) return x + Apply(_afterAttn, _attn!.Forward(Apply(_beforeAttn, x, ctx), ctx));
        if (_attn is null) return x + Apply(_afterFf, FeedForward(Apply(_beforeFf, x, ctx), ctx));
        if (_form.NormedResiduals is { } nr)
        {
            // MiniMaxDecoderLayer: the residual is the norm's output, each term weighted by the config's factors.
            var n = Apply(_beforeAttn, x, ctx);
            var hn = n * nr.AttentionAlpha + _attn.Forward(n, ctx) * nr.AttentionBeta;
            var fn = Apply(_beforeFf, hn, ctx);
            return fn * nr.FeedForwardAlpha + FeedForward(fn, ctx) * nr.FeedForwardBeta;
        }
        double m = _form.ResidualMultiplier;
        if (_form.Parallel)
        {
            var normed = Apply(_beforeAttn, x, ctx);
            return x + _attn.Forward(normed, ctx) + FeedForward(normed, ctx);
        }
        var a = Apply(_afterAttn, _attn.Forward(Apply(_beforeAttn, x, ctx), ctx));
        if (m != 1.0) a = a * m;
        var h = _attnAffine is not null ? _attnAffine.Forward(a, x) : (_attnScale is null ? x : _attnScale * x) + a;
        var f = Apply(_afterFf, FeedForward(Apply(_beforeFf, h, ctx), ctx));
        if (m != 1.0) f = f * m;
        return _ffAffine is not null ? _ffAffine.Forward(f, h) : (_ffScale is null ? h : _ffScale * h) + f;
    }
}

/// <summary>
/// ZAYA's <c>ZayaResidualScaling</c>: <c>(h + hidden_states_bias) · hidden_states_scale + (r + residual_bias) ·
/// residual_scale</c> for a sublayer output h and its residual r (scales start at one, biases at zero).
/// </summary>
public sealed class AffineResidual : HfModule
{
    readonly Parameter _hScale, _hBias, _rScale, _rBias;

    public AffineResidual(long hidden, Init init)
    {
        _hScale = AddParameter("hidden_states_scale", init.Ones(hidden));
        _hBias = AddParameter("hidden_states_bias", init.Zeros(hidden));
        _rScale = AddParameter("residual_scale", init.Ones(hidden));
        _rBias = AddParameter("residual_bias", init.Zeros(hidden));
    }

    public Tensor Forward(Tensor h, Tensor residual) => (h + _hBias) * _hScale + (residual + _rBias) * _rScale;
}
