using System.Globalization;
using Spectre.Console;

namespace MoeLora.Cli.Infrastructure;

/// <summary>
/// Range and choice checks for option values, run by each settings class's <c>Validate()</c> before any work starts.
/// A failure is a malformed command line (exit 2) whose one-line message names the flag as the user typed it.
/// </summary>
public static class OptionChecks
{
    /// <summary>The first failed check, or success.</summary>
    public static ValidationResult First(params string?[] problems) =>
        problems.FirstOrDefault(p => p is not null) is { } p ? ValidationResult.Error(p) : ValidationResult.Success();

    public static string? AtLeast(long? value, long min, string flag) =>
        value is { } v && v < min ? $"{flag} {v}: must be at least {min}" : null;

    public static string? Positive(double? value, string flag) =>
        value is { } v && !(v > 0 && double.IsFinite(v)) ? $"{flag} {Show(v)}: must be a positive number" : null;

    public static string? NonNegative(double? value, string flag) =>
        value is { } v && !(v >= 0 && double.IsFinite(v)) ? $"{flag} {Show(v)}: must be zero or a positive number" : null;

    /// <summary>lo ≤ value &lt; hi (or ≤ hi when <paramref name="inclusiveHigh"/>).</summary>
    public static string? Between(double? value, double lo, double hi, string flag, bool inclusiveHigh = true) =>
        value is { } v && !(v >= lo && (inclusiveHigh ? v <= hi : v < hi))
            ? $"{flag} {Show(v)}: must be between {Show(lo)} and {Show(hi)}{(inclusiveHigh ? "" : " (exclusive)")}" : null;

    public static string? OneOf(string? value, string flag, params string[] allowed) => OneOf(value, flag, false, allowed);

    public static string? OneOf(string? value, string flag, bool ignoreCase, params string[] allowed) =>
        value is null || allowed.Contains(value, ignoreCase ? StringComparer.OrdinalIgnoreCase : StringComparer.Ordinal) ? null
            : $"{flag} '{value}': use {string.Join(", ", allowed[..^1])} or {allowed[^1]}";

    /// <summary>Runs a parser that throws a user error and turns its message into a validation failure.</summary>
    /// <param name="flag">Prefixed to the message when the parser's own wording does not name it.</param>
    public static string? Parses(Action parse, string? flag = null)
    {
        try { parse(); return null; }
        catch (MoeLora.Core.UserInputException e)
        {
            return flag is null || e.Message.Contains(flag, StringComparison.Ordinal) ? e.Message : $"{flag}: {e.Message}";
        }
    }

    static string Show(double v) => v.ToString(CultureInfo.InvariantCulture);
}
