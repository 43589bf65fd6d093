using System.Globalization;
using System.Reflection;
using Spectre.Console.Cli;

namespace MoeLora.Cli.Infrastructure;

/// <summary>
/// Finds an option that needs a value but was given none: last on the line (<c>report --output</c>), followed by
/// another option (<c>--rank --alpha 8</c>), or with nothing after its '=' (<c>--output=</c>). Spectre.Console.Cli 0.57
/// does not reject the first two; it hands the option its internal token "__default_command" as the value, so
/// <c>--output</c> wrote a file of that name and <c>--target-modules</c> searched the model for it. The third it rejects
/// without naming the option. Checked before Spectre parses, as a usage error.
/// </summary>
public static class MissingOptionValue
{
    /// <summary>"--flag needs a value" for the first such option in <paramref name="args"/>, or null.</summary>
    public static string? Find(IReadOnlyList<string> args)
    {
        // The names come from reflection, made only when a token could be an option left without its value: most
        // command lines have none (start-up time).
        HashSet<string>? valued = null;
        bool TakesValue(string name) => (valued ??= ValueTakingOptions()).Contains(name);
        for (int i = 0; i < args.Count; i++)
        {
            var token = args[i];
            if (!IsOptionToken(token)) continue;
            // "--output=" (Spectre says only "Expected an option value", without naming the option).
            if (token.EndsWith('=')) { if (TakesValue(token[..^1])) return $"{token[..^1]} needs a value"; continue; }
            if ((i == args.Count - 1 || IsOptionToken(args[i + 1])) && TakesValue(token)) return $"{token} needs a value";
        }
        return null;
    }

    /// <summary>A token that reads as an option name, not a value: starts with '-' and is not a number ("-1", "-0.5").</summary>
    private static bool IsOptionToken(string token) =>
        token.Length > 1 && token[0] == '-' && !double.TryParse(token, NumberStyles.Float, CultureInfo.InvariantCulture, out _);

    /// <summary>
    /// Every "--long" and "-s" name whose option takes a value, across the tool's settings classes. No name is a value
    /// option in one command and a flag in another (ValueTakingNamesAreNeverFlags checks), so one set serves all commands.
    /// </summary>
    internal static HashSet<string> ValueTakingOptions()
    {
        var names = new HashSet<string>(StringComparer.Ordinal);
        foreach (var attribute in OptionAttributes().Where(a => a.ValueName is not null))
        {
            foreach (var n in attribute.LongNames) names.Add("--" + n);
            foreach (var n in attribute.ShortNames) names.Add("-" + n);
        }
        return names;
    }

    /// <summary>The [CommandOption] attribute of every property of every settings class in the tool.</summary>
    // Native AOT keeps this assembly whole (TrimmerRootAssembly in the project file), so no settings type or property is
    // trimmed away; Spectre.Console.Cli reflects over the same types for the same reason.
    [System.Diagnostics.CodeAnalysis.UnconditionalSuppressMessage("Trimming", "IL2026", Justification = "The tool's assembly is a trimmer root.")]
    [System.Diagnostics.CodeAnalysis.UnconditionalSuppressMessage("Trimming", "IL2070", Justification = "The tool's assembly is a trimmer root.")]
    internal static IEnumerable<CommandOptionAttribute> OptionAttributes() =>
        typeof(MissingOptionValue).Assembly.GetTypes()
            .Where(t => typeof(CommandSettings).IsAssignableFrom(t))
            .SelectMany(t => t.GetProperties(BindingFlags.Public | BindingFlags.Instance | BindingFlags.DeclaredOnly))
            .SelectMany(p => p.GetCustomAttributes<CommandOptionAttribute>());
}
