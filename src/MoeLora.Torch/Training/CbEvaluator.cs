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
        double cosSum = 0, tokSum = 0, rrSum = 0; var perLayer = new double[targetLayers.Count];
        foreach (var chunk in cb.Chunk(batchSize))
        {
            using var scope = NewDisposeScope();
            var b = CbDataset.Stack(chunk);
            var mask = b.AttentionMask.to(model.Device);
            Tensor Targets() { using var o = model.Forward(b.InputIds, mask, true); return stack(targetLayers.Select(l => o.HiddenStates[l]).ToArray()); }
            Tensor orig; using (LoraInjector.DisableAdapters(model)) orig = Targets();
            Tensor cur; using (withAdapter ? null : LoraInjector.DisableAdapters(model)) cur = Targets();
            var m = mask.to(ScalarType.Float32);
            var cos = nn.functional.cosine_similarity(cur.to(ScalarType.Float32), orig.to(ScalarType.Float32), -1); // [T,B,S]
            double n = m.sum().item<float>();
            for (int t = 0; t < perLayer.Length; t++) perLayer[t] += (cos[t] * m).sum().item<float>();
            cosSum += (cos * m).sum().item<float>();
            rrSum += CircuitBreakerLoss.Reroute(cur, orig, mask).item<float>() * n * targetLayers.Count;
            tokSum += n;
        }
        double distSum = 0, distCount = 0, relNum = 0, relDen = 0;
        foreach (var chunk in retain.Chunk(batchSize))
        {
            using var scope = NewDisposeScope();
            var b = CbDataset.Stack(chunk);
            var mask = b.AttentionMask.to(model.Device);
            Tensor All() { using var o = model.Forward(b.InputIds, mask, true); var h = stack(o.HiddenStates); return h * CircuitBreakerLoss.LayerMask(mask, h.shape[0]); }
            Tensor orig; using (LoraInjector.DisableAdapters(model)) orig = All();
            Tensor cur; using (withAdapter ? null : LoraInjector.DisableAdapters(model)) cur = All();
            var d = (cur - orig).to(ScalarType.Float32).norm(-1, false, 2); // [L,B,S]
            distSum += d.sum().item<float>(); distCount += d.numel();
            relNum += d.sum().item<float>();
            relDen += orig.to(ScalarType.Float32).norm(-1, false, 2).sum().item<float>();
        }
        double cbTokens = Math.Max(tokSum, 1);
        return new CbEvalResult(cosSum / (cbTokens * targetLayers.Count), perLayer.Select(x => x / cbTokens).ToList(),
            rrSum / (cbTokens * targetLayers.Count), distSum / Math.Max(distCount, 1), relNum / Math.Max(relDen, 1e-12), cb.Count, retain.Count);
    }
}
