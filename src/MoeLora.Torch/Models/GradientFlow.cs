using MoeLora.Torch.Lora;
using MoeLora.Torch.Nn;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Models;

/// <summary>
/// One fused-expert LoRA (a ParamWrapper on a 3-D expert parameter) after a backward: which experts' slices of
/// lora_A (rows e·r..e·r+r) and lora_B (columns k·E+e, k &lt; r) got non-zero gradients, and how many (token, slot)
/// pairs the router dispatched to each expert in that forward.
/// </summary>
public sealed record ExpertGradientFlow(string Module, string Parameter, long NumExperts, long[] SelectedCounts, bool[] GradA, bool[] GradB)
{
    public IEnumerable<long> Selected => Enumerable.Range(0, (int)NumExperts).Where(e => SelectedCounts[e] > 0).Select(e => (long)e);
    public IEnumerable<long> WithGradient => Enumerable.Range(0, (int)NumExperts).Where(e => GradA[e] || GradB[e]).Select(e => (long)e);
    /// <summary>The §4.3 claim: an expert's adapter slice gets gradient exactly when the router selected that expert.</summary>
    public bool GradientOnlyWhereSelected => Selected.SequenceEqual(WithGradient);
}

public static class GradientFlow
{
    /// <summary>
    /// Cross-entropy (next token, wrapping around) on <paramref name="inputIds"/>, one backward, then per fused-expert adapter the
    /// experts with gradient vs the experts dispatched. Gradients are cleared afterwards.
    /// </summary>
    public static IReadOnlyList<ExpertGradientFlow> Measure(CausalLm model, Tensor inputIds, Tensor attentionMask)
    {
        var trainable = model.NamedParameters().Where(p => p.Param.requires_grad).Select(p => p.Param).ToList();
        foreach (var p in trainable) p.grad = null;
        using (var scope = NewDisposeScope())
        {
            using var output = model.Forward(inputIds, attentionMask);
            // Next-token targets, the last position predicting the first token, so that every position feeds the loss
            // (with plain causal-LM shifting the last token's expert choices could never receive gradient).
            var logits = output.Logits.to(ScalarType.Float32);
            var labels = inputIds.roll(-1, 1).to(model.Device).masked_fill(attentionMask.to(model.Device).eq(0), -100);
            var loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[^1]), labels.reshape(-1), ignore_index: -100);
            loss.backward();
            Nn.BackwardHandles.Release();
        }
        var result = new List<ExpertGradientFlow>();
        foreach (var (name, module) in model.NamedModules())
        {
            if (module is not ParamLora w) continue;
            var owner = OwnerOf(w);
            var moduleName = name;
            while (moduleName.EndsWith(".base_layer", StringComparison.Ordinal)) moduleName = moduleName[..^".base_layer".Length];
            result.Add(new ExpertGradientFlow(moduleName, w.ParameterName, w.NumExperts,
                // Identity experts (LongCat's extra gate_up_proj rows) never compute: counted as not selected.
                [.. (owner.LastSelectedCounts ?? []).Concat(new long[w.NumExperts]).Take((int)w.NumExperts)],
                PerExpert(w.A.weight.grad, w.NumExperts, rowsExpertMajor: true),
                PerExpert(w.B.weight.grad, w.NumExperts, rowsExpertMajor: false)));
        }
        foreach (var p in trainable) p.grad = null;
        return result;
    }

    static ExpertsBase OwnerOf(ParamLora w)
    {
        HfModule m = w;
        while (m is LoraWrapper lw) m = lw.Children.First(c => c.Name == "base_layer").Module;
        return (ExpertsBase)m;
    }

    /// <summary>lora_A (r·E, in): expert e owns rows e·r..e·r+r. lora_B (out, r·E): expert e owns columns k·E+e.</summary>
    static bool[] PerExpert(Tensor? grad, long experts, bool rowsExpertMajor)
    {
        if (grad is null) return new bool[experts];
        using var scope = NewDisposeScope();
        var g = grad.abs().to(ScalarType.Float32);
        var per = rowsExpertMajor
            ? g.reshape(experts, -1).amax([1])                     // (E, r·in)
            : g.reshape(g.shape[0], -1, experts).amax([0, 1]);      // (out, r, E) → (E)
        return per.gt(0).cpu().data<bool>().ToArray();
    }
}
