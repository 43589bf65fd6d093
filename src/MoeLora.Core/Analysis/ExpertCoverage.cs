using System.Text.RegularExpressions;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Core.Analysis;

/// <summary>Which routed experts carry adapters, and how (distinct modules or slices of fused tensors).</summary>
public sealed record ExpertCoverage
{
    public required long ExpertsPerLayer { get; init; }

    public required int MoeLayers { get; init; }

    /// <summary>MoE layers where at least one routed expert has an adapter.</summary>
    public required int LayersWithExpertAdapters { get; init; }

    /// <summary>Largest number of distinct experts with an adapter in any one MoE layer.</summary>
    public required long ExpertsWithAdapters { get; init; }

    /// <summary><c>distinct modules</c> (v4 per-expert nn.Linear), <c>per-expert slices</c> (ParamWrapper), or <c>none</c>.</summary>
    public required string Mode { get; init; }

    private static readonly Regex ExpertIndex = new(@"\.experts\.(\d+)\.", RegexOptions.CultureInvariant);

    public static ExpertCoverage Build(AdapterPlan plan)
    {
        var experts = plan.Targets.Where(t => t.Location == ModuleLocation.RoutedExpert).ToList();
        // Per layer: the experts 0..Range-1 that fused-tensor adapters cover (a range, not a set: DeepSeek-V3's 256
        // experts in 58 layers made sets a notable share of a cold `report`'s fresh memory), plus the indices of
        // per-expert modules.
        var perLayer = new Dictionary<int, (long Range, HashSet<long>? Indices)>();
        foreach (var t in experts)
        {
            var layer = t.Layer ?? -1;
            var entry = perLayer.GetValueOrDefault(layer);
            if (t.Kind == AdapterKind.Parameter)
            {
                // A 2-D parameter stacking all experts' rows (DBRX) is adapted as one matrix: it still covers them all.
                var covered = Math.Max(t.NumExperts, plan.Spec.Tree.Find(t.ModuleName)?.NumExperts ?? 1);
                // A fused tensor may hold slices that are no routed expert (LongCat sizes gate_up_proj for its identity
                // experts too): count only the experts the model routes to.
                if (plan.Spec.Moe.NumExperts > 0) covered = Math.Min(covered, plan.Spec.Moe.NumExperts);
                entry.Range = Math.Max(entry.Range, covered);
            }
            else
            {
                var m = ExpertIndex.Match(t.ModuleName + ".");
                if (m.Success) (entry.Indices ??= []).Add(long.Parse(m.Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture));
            }
            perLayer[layer] = entry;
        }
        static long Covered((long Range, HashSet<long>? Indices) e) => e.Range + (e.Indices?.Count(i => i >= e.Range) ?? 0);
        var stacked = experts.Where(t => t.Kind == AdapterKind.Parameter && t.NumExperts == 1).ToList();
        var mode = experts.Count == 0 ? "none"
            : stacked.Count == experts.Count ? "one LoRA over the stacked experts' rows (shared by all experts, not r per expert)"
            : experts.All(t => t.IsPerExpertSlices) ? "per-expert slices of fused LoRA tensors"
            : experts.All(t => t.Kind != AdapterKind.Parameter) ? "distinct LoRA modules per expert"
            : "mixed";
        return new ExpertCoverage
        {
            ExpertsPerLayer = plan.Spec.Moe.NumExperts,
            MoeLayers = plan.Spec.Moe.MoeLayers.Count,
            LayersWithExpertAdapters = perLayer.Count,
            ExpertsWithAdapters = perLayer.Count == 0 ? 0 : perLayer.Values.Max(Covered),
            Mode = mode,
        };
    }
}
