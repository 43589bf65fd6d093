using MoeLora.Core.Architectures;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Peft;

/// <summary>What PEFT's v4→v5 MoE rewrite did to a config (null fields: nothing changed).</summary>
/// <param name="Pattern">The conversion pattern applied (<c>mixtral</c> or <c>qwen2_moe</c>).</param>
/// <param name="Moved">Old target names moved into target_parameters, with their new names.</param>
/// <param name="DoubledGateUp">True when gate and up were fused, doubling r and alpha for gate_up_proj.</param>
public sealed record ConversionNote(string Pattern, IReadOnlyList<KeyValuePair<string, string>> Moved, bool DoubledGateUp, IReadOnlyList<string>? ResolvedFrom);

/// <summary>
/// PEFT's <c>convert_peft_config_for_transformers</c> / <c>_convert_peft_config_moe</c> (peft ≥ 0.19 under
/// transformers 5): v4 expert and router names in <c>target_modules</c> are moved to <c>target_parameters</c> on the
/// fused experts, and gate+up fusion doubles r and alpha for <c>gate_up_proj</c>.
/// </summary>
public static class MoeConversion
{
    public static LoraConfig Apply(LoraConfig config, ModelSpec spec, PeftVersion version, out ConversionNote? note)
    {
        note = null;
        var rules = PeftModelTables.ConversionRules(spec.ModelType);
        if (rules is null || spec.Layout != Layout.V5 || !version.ConvertsMoeTargets) return config;

        IReadOnlyList<string>? resolvedFrom = null;
        IEnumerable<string> targets = config.TargetModules?.Names ?? [];
        if (config.TargetModules?.Pattern is not null)
        {
            if (!version.ConvertsStringTargets) return config;
            var resolved = ResolveString(config, spec, version, rules);
            // Nothing matched: PEFT leaves the string alone for the standard not-found error.
            if (resolved.Count == 0) return config;
            resolvedFrom = [config.TargetModules.Pattern];
            targets = resolved;
        }

        var targetParameters = new List<string>(config.TargetParameters ?? []);
        var remaining = new List<string>();
        var moved = new List<KeyValuePair<string, string>>();
        var presentFused = new HashSet<string>(StringComparer.Ordinal);
        foreach (var target in targets.Distinct(StringComparer.Ordinal))
        {
            var hit = rules.Map.FirstOrDefault(kv => target == kv.Key || target.EndsWith("." + kv.Key, StringComparison.Ordinal));
            if (hit.Key is null)
            {
                remaining.Add(target);
                continue;
            }
            if (!targetParameters.Contains(hit.Value)) targetParameters.Add(hit.Value);
            moved.Add(new(target, hit.Value));
            if (rules.FusedGateUp.Contains(hit.Key)) presentFused.Add(hit.Key);
        }

        if (presentFused.Count > 0 && presentFused.Count < rules.FusedGateUp.Count)
        {
            var missing = string.Join(", ", rules.FusedGateUp.Where(n => !presentFused.Contains(n)).Order(StringComparer.Ordinal));
            var present = string.Join(", ", presentFused.Order(StringComparer.Ordinal));
            throw new PeftInjectionException("ValueError",
                $"Cannot convert PEFT target(s) {present} without also targeting {missing} because they are fused into gate_up_proj.");
        }

        var rank = config.RankPattern.ToList();
        var alpha = config.AlphaPattern.ToList();
        var doubled = presentFused.Count == rules.FusedGateUp.Count;
        if (doubled)
        {
            const string key = ".*\\.gate_up_proj";
            Set(rank, key, config.R * rules.FusedGateUp.Count);
            Set(alpha, key, config.LoraAlpha * rules.FusedGateUp.Count);
        }

        note = new ConversionNote(rules.Pattern, moved, doubled, resolvedFrom);
        return config with
        {
            // Python sets: the order of these lists carries no meaning; keep them sorted for stable output.
            TargetModules = ModuleSelector.List(remaining.Order(StringComparer.Ordinal)),
            TargetParameters = targetParameters.Order(StringComparer.Ordinal).ToList(),
            RankPattern = rank,
            AlphaPattern = alpha,
        };
    }

    /// <summary>Python dict assignment: replace in place if the key exists, else append.</summary>
    private static void Set<T>(List<KeyValuePair<string, T>> list, string key, T value)
    {
        var i = list.FindIndex(kv => kv.Key == key);
        if (i >= 0) list[i] = new(key, value);
        else list.Add(new(key, value));
    }

    /// <summary>
    /// <c>_resolve_string_target_modules</c> (peft ≥ 0.20): all-linear → leaf names of the linear layers plus every old
    /// name; a regex → leaf names of the module and parameter keys it matches, plus old expert names recovered by
    /// probing <c>&lt;experts container&gt;.&lt;old name&gt;</c>.
    /// </summary>
    private static HashSet<string> ResolveString(LoraConfig config, ModelSpec spec, PeftVersion version, MoeConversionRules rules)
    {
        var tree = spec.Tree;
        if (config.TargetModules!.IsAllLinear)
        {
            var leaves = AllLinear.FullNames(spec).Select(Leaf).ToHashSet(StringComparer.Ordinal);
            foreach (var kv in rules.Map) leaves.Add(kv.Key);
            return leaves;
        }

        var matcher = new TargetMatcher(config, version);
        var keys = tree.Modules.Select(m => m.Name).Concat(tree.Parameters.Select(p => p.Name));
        var matched = keys.Where(k => matcher.Check(k) == MatchResult.Match).Select(Leaf).ToHashSet(StringComparer.Ordinal);
        var containers = tree.Parameters.GroupBy(p => p.LocalName)
            .ToDictionary(g => g.Key, g => g.Select(p => p.Name[..(p.Name.Length - p.LocalName.Length - 1)]).ToList(), StringComparer.Ordinal);
        foreach (var (oldName, newName) in rules.Map)
        {
            if (matched.Contains(oldName) || !containers.TryGetValue(newName, out var list)) continue;
            if (list.Any(container => matcher.Check(container + "." + oldName) == MatchResult.Match)) matched.Add(oldName);
        }
        return matched;
    }

    private static string Leaf(string name) => name[(name.LastIndexOf('.') + 1)..];
}

/// <summary>PEFT's <c>_maybe_include_all_linear_layers</c>: every nn.Linear except the output embedding.</summary>
public static class AllLinear
{
    public static IReadOnlyList<string> FullNames(ModelSpec spec) =>
        spec.Tree.Modules.Where(m => m.Kind == ModuleKind.Linear && m.Name != spec.OutputEmbeddings).Select(m => m.Name).ToList();
}
