using Spectre.Console;
using Spectre.Console.Rendering;

namespace MoeLora.Cli.Rendering;

/// <summary>
/// Wraps a line of Python (a <c>LoraConfig(...)</c> call) at the width it is rendered in, breaking after a comma or at
/// a space outside string literals: Spectre breaks only at spaces and splits a word that is wider than the line, which
/// cut <c>"v_proj"</c> in two in a list written without spaces. A comma inside brackets may end a Python line, so the
/// wrapped text can still be copied into a script.
/// </summary>
public static class CodeWrap
{
    /// <param name="prefix">What the first line starts with (an indent); continuation lines get it plus four spaces.</param>
    public static string Wrap(string code, string prefix, int width)
    {
        if (prefix.Length + code.Length <= width) return prefix + code;
        var continuation = prefix + "    ";
        var breaks = Breaks(code);
        var lines = new List<string>();
        int start = 0;
        var lead = prefix;
        while (start < code.Length)
        {
            var room = width - lead.Length;
            if (code.Length - start <= room)
            {
                lines.Add(lead + code[start..]);
                break;
            }
            // The last break that keeps the line within the width, else the first one after it (the line overflows).
            var fit = breaks.Where(b => b > start && b - start <= room).DefaultIfEmpty(-1).Max();
            if (fit < 0) fit = breaks.FirstOrDefault(b => b > start, code.Length);
            lines.Add(lead + code[start..fit].TrimEnd());
            start = fit;
            while (start < code.Length && code[start] == ' ') start++;
            lead = continuation;
        }
        return string.Join("\n", lines);
    }

    /// <summary>Positions a line may start at: after a comma or a space that is not inside a string literal.</summary>
    private static List<int> Breaks(string code)
    {
        var breaks = new List<int>();
        bool quoted = false;
        for (int i = 0; i < code.Length; i++)
        {
            var c = code[i];
            if (quoted)
            {
                if (c == '\\') i++;
                else if (c == '"') quoted = false;
                continue;
            }
            if (c == '"') quoted = true;
            else if (c is ',' or ' ') breaks.Add(i + 1);
        }
        return breaks;
    }
}

/// <summary>Markup built for the width it is rendered in (e.g. with <see cref="CodeWrap"/>).</summary>
public sealed class WidthMarkup(Func<int, string> markup) : IRenderable
{
    public Measurement Measure(RenderOptions options, int maxWidth) => ((IRenderable)new Markup(markup(maxWidth))).Measure(options, maxWidth);

    public IEnumerable<Segment> Render(RenderOptions options, int maxWidth) => ((IRenderable)new Markup(markup(maxWidth))).Render(options, maxWidth);
}
