using System.Collections.Concurrent;
using System.Text.RegularExpressions;

namespace MoeLora.Core.Peft;

/// <summary>
/// Python <c>re.fullmatch</c> / <c>re.match</c> on .NET regexes. The two dialects agree on what PEFT configs use;
/// Python-only spellings (named groups, <c>\Z</c>) are translated.
/// </summary>
public static class PyRegex
{
    private static readonly ConcurrentDictionary<string, Regex> Cache = new(StringComparer.Ordinal);

    public static bool FullMatch(string pattern, string text) => Get("^(?:" + Translate(pattern) + ")\\z", pattern).IsMatch(text);

    /// <summary><c>re.match</c>: anchored at the start only.</summary>
    public static Match Match(string pattern, string text) => Get("^(?:" + Translate(pattern) + ")", pattern).Match(text);

    /// <summary>
    /// <c>re.match(pattern + "$", text)</c> for end-anchored patterns such as PEFT's rank/alpha keys
    /// (<c>(.*\.)?(pat)$</c>). Matched right to left, so a leading <c>.*</c> does not make it quadratic.
    /// </summary>
    public static bool MatchesAnchoredAtEnd(string pattern, string text) =>
        Get("^(?:" + Translate(pattern) + ")", pattern, RegexOptions.RightToLeft).IsMatch(text);

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

    private static Regex Get(string dotnetPattern, string original, RegexOptions extra = RegexOptions.None)
    {
        return Cache.GetOrAdd(extra == RegexOptions.None ? dotnetPattern : extra + ":" + dotnetPattern, _ =>
        {
            try
            {
                return new Regex(dotnetPattern, RegexOptions.CultureInvariant | extra);
            }
            catch (ArgumentException e)
            {
                throw new PeftConfigException($"'{original}' is not a valid regular expression: {e.Message}");
            }
        });
    }
}
