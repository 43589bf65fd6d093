using System.Collections.Concurrent;
using System.Text.RegularExpressions;

namespace MoeLora.Core.Peft;

/// <summary>
/// Python <c>re.fullmatch</c> / <c>re.match</c> on .NET regexes. The two dialects agree on what PEFT configs use;
/// Python-only spellings (named groups, <c>\Z</c>) are translated.
/// </summary>
public static class PyRegex
{
    /// <summary>How a Python pattern is anchored and matched; with the pattern, the key of its compiled regex.</summary>
    private enum Anchoring { Full, Start, StartRightToLeft, PatternKey }

    // Keyed by the Python pattern as given, so that a lookup (thousands per report: every module, every re-plan)
    // builds no string; the .NET pattern is made once, when the regex is compiled.
    private static readonly ConcurrentDictionary<(string Pattern, Anchoring Anchoring), Regex> Cache = new();

    public static bool FullMatch(string pattern, string text) => Get(pattern, Anchoring.Full).IsMatch(text);

    /// <summary><c>re.match</c>: anchored at the start only.</summary>
    public static Match Match(string pattern, string text) => Get(pattern, Anchoring.Start).Match(text);

    /// <summary>
    /// <c>re.match(pattern + "$", text)</c> for end-anchored patterns such as PEFT's rank/alpha keys
    /// (<c>(.*\.)?(pat)$</c>). Matched right to left, so a leading <c>.*</c> does not make it quadratic.
    /// </summary>
    public static bool MatchesAnchoredAtEnd(string pattern, string text) => Get(pattern, Anchoring.StartRightToLeft).IsMatch(text);

    /// <summary>
    /// PEFT's rank/alpha pattern lookup, <c>re.match(rf"(.*\.)?({key})$", name)</c>: <paramref name="key"/> matches
    /// <paramref name="text"/> or a dot-bounded suffix of it (as <see cref="MatchesAnchoredAtEnd"/>).
    /// </summary>
    public static bool MatchesPatternKey(string key, string text) => Get(key, Anchoring.PatternKey).IsMatch(text);

    /// <summary>Throws <see cref="PeftConfigException"/> when the pattern does not compile.</summary>
    public static void Validate(string pattern, string field)
    {
        try
        {
            _ = new Regex(Translate(pattern), RegexOptions.CultureInvariant);
        }
        catch (ArgumentException e)
        {
            throw new PeftConfigException($"{field} '{pattern}' is not a valid regular expression: {e.Message}");
        }
    }

    private static string Translate(string pattern) =>
        pattern.Replace("(?P<", "(?<", StringComparison.Ordinal)
            .Replace("(?P=", "\\k<", StringComparison.Ordinal)
            .Replace("\\Z", "\\z", StringComparison.Ordinal);

    private static Regex Get(string pattern, Anchoring anchoring) =>
        Cache.TryGetValue((pattern, anchoring), out var regex) ? regex : Cache.GetOrAdd((pattern, anchoring), static key => Compile(key.Pattern, key.Anchoring));

    private static Regex Compile(string pattern, Anchoring anchoring)
    {
        var (dotnetPattern, extra) = anchoring switch
        {
            Anchoring.Full => ("^(?:" + Translate(pattern) + ")\\z", RegexOptions.None),
            Anchoring.Start => ("^(?:" + Translate(pattern) + ")", RegexOptions.None),
            Anchoring.StartRightToLeft => ("^(?:" + Translate(pattern) + ")", RegexOptions.RightToLeft),
            _ => ("^(?:" + Translate("(.*\\.)?(" + pattern + ")$") + ")", RegexOptions.RightToLeft),
        };
        try
        {
            return new Regex(dotnetPattern, RegexOptions.CultureInvariant | extra);
        }
        catch (ArgumentException e)
        {
            throw new PeftConfigException($"'{(anchoring == Anchoring.PatternKey ? "(.*\\.)?(" + pattern + ")$" : pattern)}' is not a valid regular expression: {e.Message}");
        }
    }
}
