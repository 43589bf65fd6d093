using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Training;

/// <summary>Rerouting and retain metrics of one model state against the frozen base (adapters disabled).</summary>
public sealed record CbEvalResult(double CbCosine, IReadOnlyList<double> CbCosinePerLayer, double RerouteLoss, double RetainDistance,
    double RetainRelativeDistance, int CbExamples, int RetainExamples);

/// <summary>
/// Held-out evaluation: on circuit-breaker examples the mean per-token cosine between the model's and the base model's
/// hidden states at the target layers (1 = not rerouted, ≤0 = rerouted) and the RR loss; on retain examples the
/// retain loss (mean ‖Δh‖ over all hidden states and positions, as trained) and ‖Δh‖/‖h‖ over real tokens.
/// </summary>
public static class CbEvaluator
{
    public static CbEvalResult Evaluate(CausalLm model, IReadOnlyList<Tokenised> cb, IReadOnlyList<Tokenised> retain,
        IReadOnlyList<int> targetLayers, int batchSize, bool withAdapter)
    {
        model.Eval();
        using var _ = no_grad();
        // Sums kept on the device in float64 and read once at the end: on CUDA the batches' forwards queue back to back.
        using var sums = NewDisposeScope();
        var dev = model.Device;
        var perLayer = zeros(targetLayers.Count, ScalarType.Float64, dev);
        Tensor tokSum = zeros(1, ScalarType.Float64, dev), rrSum = zeros(1, ScalarType.Float64, dev);
        foreach (var chunk in cb.Chunk(batchSize))
        {
            using var scope = NewDisposeScope();
            var b = CbDataset.Stack(chunk);
            var mask = b.AttentionMask.to(dev);
            Tensor Targets() { using var o = model.Forward(b.InputIds, mask, true); return stack(targetLayers.Select(l => o.HiddenStates[l]).ToArray()); }
            Tensor orig; using (LoraInjector.DisableAdapters(model)) orig = Targets();
            Tensor cur; using (withAdapter ? null : LoraInjector.DisableAdapters(model)) cur = Targets();
            var m = mask.to(ScalarType.Float32);
            var cos = nn.functional.cosine_similarity(cur.to(ScalarType.Float32), orig.to(ScalarType.Float32), -1); // [T,B,S]
            var n = m.sum().to(ScalarType.Float64);
            perLayer.add_((cos * m).sum([1, 2]).to(ScalarType.Float64));
            rrSum.add_(CircuitBreakerLoss.Reroute(cur, orig, mask).to(ScalarType.Float64) * n * targetLayers.Count);
            tokSum.add_(n);
        }
        Tensor distSum = zeros(1, ScalarType.Float64, dev), relDen = zeros(1, ScalarType.Float64, dev);
        long distCount = 0;
        foreach (var chunk in retain.Chunk(batchSize))
        {
            using var scope = NewDisposeScope();
            var b = CbDataset.Stack(chunk);
            var mask = b.AttentionMask.to(dev);
            Tensor All() { using var o = model.Forward(b.InputIds, mask, true); var h = stack(o.HiddenStates); return h * CircuitBreakerLoss.LayerMask(mask, h.shape[0]); }
            Tensor orig; using (LoraInjector.DisableAdapters(model)) orig = All();
            Tensor cur; using (withAdapter ? null : LoraInjector.DisableAdapters(model)) cur = All();
            var d = (cur - orig).to(ScalarType.Float32).norm(-1, false, 2); // [L,B,S]
            distSum.add_(d.sum().to(ScalarType.Float64));
            distCount += d.numel();
            relDen.add_(orig.to(ScalarType.Float32).norm(-1, false, 2).sum().to(ScalarType.Float64));
        }
        var read = cat([perLayer, tokSum, rrSum, distSum, relDen]).cpu().data<double>().ToArray();
        int layers = targetLayers.Count;
        double cbTokens = Math.Max(read[layers], 1), rr = read[layers + 1], dist = read[layers + 2], den = read[layers + 3];
        var perLayerMean = read.Take(layers).Select(x => x / cbTokens).ToList();
        return new CbEvalResult(read.Take(layers).Sum() / (cbTokens * layers), perLayerMean,
            rr / (cbTokens * layers), dist / Math.Max(distCount, 1), dist / Math.Max(den, 1e-12), cb.Count, retain.Count);
    }
}
