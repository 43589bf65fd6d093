using System.ComponentModel;
using System.Globalization;
using MoeLora.Cli.Infrastructure;

namespace MoeLora.Cli.Options;

/// <summary>
/// A value the command line gave that is not one of the accepted words. The parser knows the value, not the option;
/// <see cref="Program"/> finds the option the user typed and prints "--format 'yaml': use text, json, ..." (exit 2).
/// </summary>
public sealed class OptionValueException(string value, string expected) : Exception($"'{value}': {expected}")
{
    public string Value { get; } = value;

    /// <summary>What the value must be, e.g. "use text, json or markdown".</summary>
    public string Expected { get; } = expected;
}

/// <summary>
/// Parses an option's text into a typed value while the command line is parsed, so a bad value is a usage error
/// before any work starts. Each typed option declares its converter with <c>[TypeConverter(typeof(...))]</c>.
/// </summary>
public abstract class ParsingConverter<T> : TypeConverter
{
    public override bool CanConvertFrom(ITypeDescriptorContext? context, Type sourceType) => sourceType == typeof(string);

    public override object? ConvertFrom(ITypeDescriptorContext? context, CultureInfo? culture, object value) =>
        value is string text ? Parse(text.Trim()) : throw new NotSupportedException($"cannot convert {value.GetType().Name}");

    /// <summary>The value, or an <see cref="OptionValueException"/> saying what is accepted.</summary>
    protected abstract T Parse(string text);
}

/// <summary>A closed set of words (with aliases) for an enum-typed option; the error lists the accepted words.</summary>
public abstract class ChoiceConverter<T> : ParsingConverter<T> where T : struct, Enum
{
    /// <summary>Word → value, the first word of each value being the one help and errors show.</summary>
    protected abstract IReadOnlyList<(string Word, T Value)> Words { get; }

    protected override T Parse(string text)
    {
        foreach (var (word, value) in Words)
            if (word.Equals(text, StringComparison.OrdinalIgnoreCase)) return value;
        throw new OptionValueException(text, "use " + Choices.List(Words.Select(w => w.Word)));
    }
}

/// <summary>Wording shared by option errors.</summary>
public static class Choices
{
    /// <summary>"a, b or c".</summary>
    public static string List(IEnumerable<string> words)
    {
        var all = words.ToArray();
        return all.Length == 1 ? all[0] : string.Join(", ", all[..^1]) + " or " + all[^1];
    }
}
