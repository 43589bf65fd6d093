using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using TorchSharp;
using static TorchSharp.torch;
using MoeLora.Core;
using MoeLora.Torch.Runtime;

namespace MoeLora.Torch.Training;

/// <summary>One batch: token ids [B,S] and attention mask [B,S] (int64, 1 = real token).</summary>
public sealed record TokenBatch(Tensor InputIds, Tensor AttentionMask);

/// <summary>
/// The losses of one micro-batch and the coefficients they were weighted with. <paramref name="Parts"/> holds
/// [retain loss, reroute loss, CB cosine] (fp32, detached; 0, 0 and NaN for a skipped pass) on the model's device and
/// is read only by <see cref="Read"/>: computing the loss never waits for the device, so on CUDA the host queues the
/// backward while the forward still runs.
/// </summary>
public sealed record CbLossResult(Tensor Total, Tensor Parts, double RetainCoeff, double CbCoeff)
{
    /// <summary>The scalar parts on the host (waits for the device).</summary>
    public CbLossValues Read() => CbLossValues.From(Parts, RetainCoeff, CbCoeff);
}

/// <summary>The scalar parts of <see cref="CbLossResult"/> on the host.</summary>
public readonly record struct CbLossValues(double RetainLoss, double CbLoss, double CbCosine, double RetainCoeff, double CbCoeff)
{
    public double TotalValue => RetainCoeff * RetainLoss + CbCoeff * CbLoss;

    /// <summary>From a [retain, reroute, cosine] tensor, read in one copy.</summary>
    public static CbLossValues From(Tensor parts, double retainCoeff, double cbCoeff)
    {
        var v = parts.to(ScalarType.Float32).cpu().data<float>().ToArray();
        return new CbLossValues(v[0], v[1], v[2], retainCoeff, cbCoeff);
    }
}

/// <summary>
/// Representation rerouting (circuit-breaker) losses exactly as <c>compute_loss</c> of GraySwanAI/circuit-breakers
/// (<c>src/lorra_circuit_breaker.py</c>): frozen passes with the adapters off, one adapted pass per batch (the CB pass's
/// target states are stacked from that one output), then the two losses.
/// </summary>
public static class CircuitBreakerLoss
{
    /// <summary>
    /// L_rr = Σ ReLU(Σ_k n^lora·n^orig·m) / Σ m, over target layers × batch × positions; norms in fp32.
    /// <paramref name="lora"/>/<paramref name="orig"/>: [T,B,S,H]; <paramref name="mask"/>: [B,S].
    /// </summary>
    public static Tensor Reroute(Tensor lora, Tensor orig, Tensor mask)
    {
        long t = lora.shape[0];
        var m = mask.unsqueeze(0).repeat(t, 1, 1).unsqueeze(-1);                          // [T,B,S,1]
        var nl = lora / lora.to(ScalarType.Float32).norm(-1, keepdim: true, p: 2);
        var no = orig / orig.to(ScalarType.Float32).norm(-1, keepdim: true, p: 2);
        var inner = nl * no * m;
        return nn.functional.relu(inner.sum(-1)).sum() / m.sum();
    }

    /// <summary>Mean per-token cosine (not floored) over real tokens: the logged/evaluated rerouting metric.</summary>
    public static Tensor Cosine(Tensor lora, Tensor orig, Tensor mask)
    {
        long t = lora.shape[0];
        var m = mask.unsqueeze(0).repeat(t, 1, 1).to(ScalarType.Float32);
        var cos = nn.functional.cosine_similarity(lora.to(ScalarType.Float32), orig.to(ScalarType.Float32), -1);
        return (cos * m).sum() / m.sum();
    }

    /// <summary>
    /// L_ret = nanmean over (L+1)×B×S of ‖m·h^lora − m·h^orig‖₂ (fp32 norm). Pads are zeroed but counted, as upstream.
    /// <paramref name="loraMasked"/>/<paramref name="origMasked"/>: [L+1,B,S,H] already multiplied by the mask.
    /// </summary>
    public static Tensor Retain(Tensor loraMasked, Tensor origMasked) =>
        NanMean((loraMasked - origMasked).to(ScalarType.Float32).norm(-1, keepdim: false, p: 2));

    /// <summary>torch.nanmean (TorchSharp 0.107's nanmean passes an uninitialised dtype to ATen, so it is spelled out).</summary>
    public static Tensor NanMean(Tensor x)
    {
        var nan = x.isnan();
        return where(nan, zeros_like(x), x).sum() / nan.logical_not().sum().to(x.dtype);
    }

    /// <summary>The retain mask repeated over L hidden states: [L,B,S,1].</summary>
    public static Tensor LayerMask(Tensor mask, long layers) => mask.unsqueeze(0).repeat(layers, 1, 1).unsqueeze(-1);

    /// <summary>
    /// The full step loss: frozen passes (adapters disabled, eval mode, no_grad), then adapted passes in train mode;
    /// <c>total = c_retain·L_ret + c_cb·L_rr</c>. A coefficient equal to 0 skips its passes, as upstream.
    /// Returns the total as a graph tensor (call backward on it) plus the scalar parts.
    /// </summary>
    public static CbLossResult Compute(CausalLm model, TokenBatch cb, TokenBatch retain, IReadOnlyList<int> targetLayers,
        double retainCoeff, double cbCoeff, bool train = true)
    {
        Tensor? origRetain = null, origCb = null;
        var retainMask = retain.AttentionMask.to(model.Device);
        var cbMask = cb.AttentionMask.to(model.Device);
        using (LoraInjector.DisableAdapters(model))
        {
            model.Eval();
            using (no_grad())
            {
                if (retainCoeff > 0)
                {
                    using var o = model.Forward(retain.InputIds, retainMask, outputHiddenStates: true);
                    var h = stack(o.HiddenStates).detach();
                    origRetain = h * LayerMask(retainMask, h.shape[0]);
                }
                if (cbCoeff > 0)
                {
                    using var o = model.Forward(cb.InputIds, cbMask, outputHiddenStates: true);
                    CheckLayers(targetLayers, o.HiddenStates.Count);
                    origCb = stack(targetLayers.Select(l => o.HiddenStates[l]).ToArray()).detach();
                }
            }
        }
        MemTrace.Mark("cb frozen passes", model.Device);
        model.Train(train);
        Tensor total = zeros(1, device: model.Device).squeeze();
        Tensor retainLoss = zeros(1, ScalarType.Float32, model.Device).squeeze(), cbLoss = retainLoss;
        Tensor cosine = full(1, float.NaN, ScalarType.Float32, model.Device).squeeze();
        if (retainCoeff > 0)
        {
            using var o = model.Forward(retain.InputIds, retainMask, outputHiddenStates: true);
            var lora = stack(o.HiddenStates) * LayerMask(retainMask, o.HiddenStates.Count);
            var l = Retain(lora, origRetain!);
            retainLoss = l.detach().to(ScalarType.Float32);
            total = total + retainCoeff * l;
            MemTrace.Mark("cb adapted retain pass", model.Device);
        }
        if (cbCoeff > 0)
        {
            using var o = model.Forward(cb.InputIds, cbMask, outputHiddenStates: true);
            var lora = stack(targetLayers.Select(i => o.HiddenStates[i]).ToArray());
            var l = Reroute(lora, origCb!, cbMask);
            cbLoss = l.detach().to(ScalarType.Float32);
            using (no_grad()) cosine = Cosine(lora, origCb!, cbMask).to(ScalarType.Float32);
            total = total + cbCoeff * l;
        }
        return new CbLossResult(total, stack([retainLoss, cbLoss, cosine]), retainCoeff, cbCoeff);
    }

    static void CheckLayers(IReadOnlyList<int> targets, int count)
    {
        foreach (var l in targets)
            if (l < 0 || l >= count)
                throw new UserInputException($"target layer {l} is out of range: hidden_states has {count} entries (0 = embeddings, {count - 1} = final norm).");
    }
}
