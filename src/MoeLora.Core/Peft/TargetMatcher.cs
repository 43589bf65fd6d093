using System.Globalization;

namespace MoeLora.Core.Peft;

public enum MatchResult
{
    NoMatch,
    Match,
    /// <summary>Excluded by <c>exclude_modules</c> or because it lies in a <c>modules_to_save</c> module.</summary>
    Excluded,
}

/// <summary>PEFT's <c>check_target_module_exists</c> (peft-semantics §1), for one LoraConfig and PEFT version.</summary>
public sealed class TargetMatcher(LoraConfig config, PeftVersion version)
{
    private readonly HashSet<string>? _targetSet = config.TargetModules?.Names?.ToHashSet(StringComparer.Ordinal);
    private readonly HashSet<string>? _excludeSet = config.ExcludeModules?.Names?.ToHashSet(StringComparer.Ordinal);
    // "." + name, built once: Check runs for every module of models with thousands of them.
    private readonly string[]? _targetSuffixes = config.TargetModules?.Names?.Select(t => "." + t).ToArray();
    private readonly string[]? _excludeSuffixes = config.ExcludeModules?.Names?.Select(t => "." + t).ToArray();

    public MatchResult Check(string key)
    {
        if (config.ExcludeModules is { } ex)
        {
            if (ex.Pattern is not null ? PyRegex.FullMatch(ex.Pattern, key) : _excludeSet!.Contains(key) || EndsWithAny(key, _excludeSuffixes!))
                return MatchResult.Excluded;
        }
        foreach (var m in config.ModulesToSave ?? [])
        {
            // PEFT does not escape the name: it is a regex fragment.
            if (PyRegex.Match("(^|.*\\.)" + m + "($|\\..*)", key).Success) return MatchResult.Excluded;
        }
        var targets = config.TargetModules;
        if (targets is null) return MatchResult.NoMatch;
        if (targets.Pattern is not null) return PyRegex.FullMatch(targets.Pattern, key) ? MatchResult.Match : MatchResult.NoMatch;
        if (_targetSet!.Contains(key)) return MatchResult.Match; // an exact full name bypasses the layer filter
        var found = EndsWithAny(key, _targetSuffixes!);
        if (found && LayerFilterActive) found = LayerSelected(key);
        return found ? MatchResult.Match : MatchResult.NoMatch;
    }

    private bool LayerFilterActive =>
        config.LayersToTransform is { } l && (config.LayersToTransformIsInt || l.Count > 0);

    /// <summary>Extracts the layer index as PEFT does and tests it against layers_to_transform.</summary>
    private bool LayerSelected(string key)
    {
        var index = LayerIndex(key, config.LayersPattern, version);
        return index is not null && config.LayersToTransform!.Contains(index.Value);
    }

    // PEFT's default layer-index regexes (any ModuleList name), one string each instead of one per module.
    private const string AnyLayer = ".*\\.[^.]*\\.(\\d+)\\.";
    private const string AnyLayerLazy = ".*?\\.[^.]*\\.(\\d+)\\.";

    /// <summary>
    /// The index PEFT reads from a key: the first (≥ 0.20) or last (≤ 0.19) <c>.name.N.</c> group, or after one of the
    /// <c>layers_pattern</c> entries (first entry that matches wins).
    /// </summary>
    public static int? LayerIndex(string key, IReadOnlyList<string>? layersPattern, PeftVersion version)
    {
        var lead = version.LazyLayerIndex ? ".*?" : ".*";
        System.Text.RegularExpressions.Match? m = null;
        if (layersPattern is null || layersPattern.Count == 0 || layersPattern.All(string.IsNullOrEmpty))
        {
            m = PyRegex.Match(version.LazyLayerIndex ? AnyLayerLazy : AnyLayer, key);
        }
        else
        {
            foreach (var p in layersPattern)
            {
                m = PyRegex.Match(lead + "\\." + p + "\\.(\\d+)\\.", key);
                if (m.Success) break;
            }
        }
        return m is { Success: true } ? int.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture) : null;
    }

    private static bool EndsWithAny(string key, string[] dottedSuffixes)
    {
        foreach (var suffix in dottedSuffixes)
            if (key.EndsWith(suffix, StringComparison.Ordinal)) return true;
        return false;
    }

    /// <summary>PEFT's list rule: equal to a target or ending with "." + target.</summary>
    public static bool IsExactOrSuffix(string key, IReadOnlyList<string> names, HashSet<string>? set = null) =>
        (set?.Contains(key) ?? names.Contains(key)) || names.Any(t => key.EndsWith("." + t, StringComparison.Ordinal));

    /// <summary>
    /// <c>get_pattern_key</c>: the first rank/alpha pattern whose regex matches a dot-bounded suffix of the key.
    /// </summary>
    public static T? PatternValue<T>(IReadOnlyList<KeyValuePair<string, T>> patterns, string key) where T : struct
    {
        // By index: foreach over the interface would allocate an enumerator for every module of every plan.
        for (var i = 0; i < patterns.Count; i++)
        {
            var kv = patterns[i];
            var hit = IsSimplePattern(kv.Key, out var anyPrefix) && !key.Contains('\n')
                ? SimplePatternMatches(kv.Key, anyPrefix, key)
                : PyRegex.MatchesPatternKey(kv.Key, key);
            if (hit) return kv.Value;
        }
        return null;
    }

    // Most rank/alpha keys are module paths such as "experts.gate_up_proj", or, as PEFT's MoE conversion writes them,
    // ".*\.gate_up_proj": an optional leading ".*", then letters, digits, '_', '.' (any character) and "\." (a dot)
    // only. Such a regex has a fixed length after the ".*", so "(.*\.)?(key)$" reduces to a comparison of the key's
    // last characters, without the regex engine (this runs for every module, in every re-plan of a report).
    private static bool IsSimplePattern(string pattern, out bool anyPrefix)
    {
        anyPrefix = pattern.StartsWith(".*", StringComparison.Ordinal);
        var i = anyPrefix ? 2 : 0;
        if (i == pattern.Length) return false;
        for (; i < pattern.Length; i++)
        {
            var c = pattern[i];
            if (char.IsAsciiLetterOrDigit(c) || c is '_' or '.') continue;
            if (c == '\\' && i + 1 < pattern.Length && pattern[i + 1] == '.')
            {
                i++;
                continue;
            }
            return false;
        }
        return true;
    }

    /// <summary>The same answer as the regex for a simple pattern and a key without line breaks: the key's last
    /// characters match the pattern (after its ".*"), and without a ".*" they are the whole key or follow a ".".</summary>
    private static bool SimplePatternMatches(string pattern, bool anyPrefix, string key)
    {
        var stop = anyPrefix ? 2 : 0;
        var k = key.Length;
        for (var p = pattern.Length - 1; p >= stop; p--)
        {
            if (--k < 0) return false;
            var c = pattern[p];
            // A backslash only ever escapes the dot after it (IsSimplePattern), so "\." read backwards is a literal dot.
            if (c == '.' && p > stop && pattern[p - 1] == '\\')
            {
                if (key[k] != '.') return false;
                p--;
            }
            else if (c != '.' && c != key[k])
            {
                return false;
            }
        }
        return anyPrefix || k == 0 || key[k - 1] == '.';
    }
}
