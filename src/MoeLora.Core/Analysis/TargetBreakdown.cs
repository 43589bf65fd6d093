using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Core.Analysis;

/// <summary>
/// One row of the report's "module matching" section: what a single requested target name (or the regex, or a
/// target_parameters entry) ended up adapting, by location, with the unique base shapes.
/// </summary>
public sealed record TargetBreakdown
{
    public required string Target { get; init; }

    /// <summary><c>target_modules</c>, <c>target_modules (regex)</c> or <c>target_parameters</c>.</summary>
    public required string Source { get; init; }

    /// <summary>Modules whose name the entry matches by PEFT's list rule, before PEFT's MoE rewrite.</summary>
    public required int NameMatches { get; init; }

    public required int Adapters { get; init; }

    public required IReadOnlyDictionary<ModuleLocation, int> ByLocation { get; init; }

    public required IReadOnlyList<string> UniqueShapes { get; init; }

    /// <summary>What PEFT did with the entry, in words (rewritten, fused, matched nothing ...).</summary>
    public string? Note { get; init; }

    /// <summary>Builds one row per requested entry.</summary>
    public static IReadOnlyList<TargetBreakdown> Build(AdapterPlan plan)
    {
        var rows = new List<TargetBreakdown>();
        var requested = plan.Requested;
        var tree = plan.Spec.Tree;
        var moved = plan.Conversion?.Moved ?? [];
        if (requested.TargetModules is { } tm)
        {
            if (tm.Pattern is not null)
            {
                var label = tm.IsAllLinear ? "all-linear" : tm.Pattern;
                var resolvedNote = plan.Conversion?.ResolvedFrom is null ? null
                    : $"PEFT resolved it to the leaf names {string.Join(", ", ResolvedLeafNames(plan))}" +
                      (moved.Count > 0 ? $" and rewrote {string.Join(", ", moved.Select(m => m.Key).Distinct())} onto fused experts" : "; nothing was moved onto fused experts");
                rows.Add(Row(label, tm.IsAllLinear ? "target_modules" : "target_modules (regex)", -1,
                    plan.Targets.Where(t => !t.TiedToEmbedding), resolvedNote));
            }
            else
            {
                foreach (var name in tm.Names!)
                {
                    var dotted = "." + name; // once per name, not once per module
                    var nameMatches = tree.Modules.Count(m => m.Name.Length > 0 && (m.Name == name || m.Name.EndsWith(dotted, StringComparison.Ordinal)));
                    var movedTo = moved.Where(m => m.Key == name).Select(m => m.Value).Distinct().ToList();
                    IEnumerable<AdapterTarget> adapters;
                    string? note = null;
                    if (movedTo.Count > 0)
                    {
                        adapters = plan.Targets.Where(t => t.Kind == AdapterKind.Parameter && movedTo.Any(p => Matches(t.Name, p)));
                        note = $"rewritten by PEFT onto target_parameters {string.Join(", ", movedTo)}" +
                               (movedTo.Contains("gate_up_proj") && plan.Conversion!.DoubledGateUp ? " (gate+up fused: r and alpha doubled)" : "");
                        // Two requested names rewritten onto one fused parameter share its adapters: the rows
                        // then count the same instances twice, which the note must say.
                        var sharing = moved.Where(m => m.Key != name && movedTo.Contains(m.Value)).Select(m => m.Key).Distinct().ToList();
                        if (sharing.Count > 0)
                            note += $"; the same adapters as {string.Join(", ", sharing)} (one fused parameter, counted in each row)";
                    }
                    else
                    {
                        adapters = plan.Targets.Where(t => t.Kind != AdapterKind.Parameter && Matches(t.ModuleName, name));
                    }
                    var list = adapters.ToList();
                    if (list.Count == 0 && note is null)
                        note = nameMatches == 0 ? "matches no module of this model" : "every match was excluded or filtered out";
                    rows.Add(Row(name, "target_modules", nameMatches, list, note));
                }
            }
        }
        foreach (var p in requested.TargetParameters ?? [])
        {
            var list = plan.Targets.Where(t => t.Kind == AdapterKind.Parameter && Matches(t.Name, p)).ToList();
            var nameMatches = tree.Parameters.Count(x => Matches(x.Name, p));
            rows.Add(Row(p, "target_parameters", nameMatches, list, list.Count == 0 ? "matches no parameter of this model" : null));
        }
        return rows;
    }

    /// <summary>The leaf names PEFT turned a regex into: those still in target_modules plus those it moved.</summary>
    public static IReadOnlyList<string> ResolvedLeafNames(AdapterPlan plan) =>
        [.. (plan.Effective.TargetModules?.Names ?? []).Concat(plan.Conversion?.Moved.Select(m => m.Key) ?? []).Distinct(StringComparer.Ordinal).Order(StringComparer.Ordinal)];

    // key == target or key ends with "." + target, without building that string for every pair.
    private static bool Matches(string key, string target) =>
        key == target || (key.Length > target.Length && key[key.Length - target.Length - 1] == '.' && key.EndsWith(target, StringComparison.Ordinal));

    private static TargetBreakdown Row(string target, string source, int nameMatches, IEnumerable<AdapterTarget> adapters, string? note)
    {
        var list = adapters.ToList();
        return new TargetBreakdown
        {
            Target = target,
            Source = source,
            NameMatches = nameMatches < 0 ? list.Count : nameMatches,
            Adapters = list.Count,
            ByLocation = list.GroupBy(t => t.Location).OrderBy(g => g.Key).ToDictionary(g => g.Key, g => g.Count()),
            UniqueShapes = list.Select(t => "(" + string.Join(", ", t.BaseShape) + ")").Distinct().ToList(),
            Note = note,
        };
    }
}
