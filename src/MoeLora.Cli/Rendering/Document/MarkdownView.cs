using System.Globalization;
using System.Text;

namespace MoeLora.Cli.Rendering.Document;

/// <summary>The Markdown view: a heading per section, tables for facts and rows, charts as data-URI SVG images.</summary>
public static class MarkdownView
{
    public static string Render(ReportDocument document)
    {
        var sb = new StringBuilder();
        sb.Append("# ").AppendLine(document.Title.Plain);
        foreach (var section in document.Sections) sb.AppendLine().Append(Render(section));
        return sb.ToString();
    }

    /// <summary>One section under a level-2 heading (commands that print a single section, e.g. plan).</summary>
    public static string Render(Section section)
    {
        var sb = new StringBuilder();
        sb.Append("## ").AppendLine(section.Title.Plain);
        foreach (var block in section.Blocks) sb.AppendLine().Append(Render(block));
        return sb.ToString();
    }

    private static string Render(Block block)
    {
        var sb = new StringBuilder();
        switch (block)
        {
            case Facts f:
                sb.AppendLine("| | |").AppendLine("|---|---|");
                foreach (var (label, value) in f.Rows) sb.AppendLine(CultureInfo.InvariantCulture, $"| {Cell(label)} | {Inline(value, cell: true)} |");
                break;
            case Paragraph p:
                sb.AppendLine(Inline(p.Content));
                break;
            case Table t:
                sb.AppendLine("| " + string.Join(" | ", t.Columns.Select(c => Cell(c.Header))) + " |");
                sb.AppendLine("|" + string.Concat(t.Columns.Select(c => c.Right ? "---:|" : "---|")));
                foreach (var row in t.Rows) sb.AppendLine("| " + string.Join(" | ", row.Select(c => Inline(c, cell: true))) + " |");
                break;
            case Items items:
                foreach (var i in items.Entries)
                    sb.AppendLine("- " + (i.Code is null ? "" : $"**{i.Code}**: ") + Inline(i.Content));
                break;
            case Steps steps:
                var n = 1;
                foreach (var s in steps.Entries)
                {
                    sb.AppendLine(CultureInfo.InvariantCulture, $"{n++}. **{Escape(s.Title)}**: {Escape(s.Detail)}");
                    if (s.Code is not null) sb.AppendLine(CultureInfo.InvariantCulture, $"   {Code(s.Code)}");
                    if (s.Outcome is not null) sb.AppendLine(CultureInfo.InvariantCulture, $"   → {Escape(s.Outcome)}");
                }
                break;
            case Chart c:
                // A data URI keeps the Markdown file self-contained.
                sb.AppendLine(CultureInfo.InvariantCulture, $"![{c.Caption}](data:image/svg+xml;base64,{Convert.ToBase64String(Encoding.UTF8.GetBytes(c.Draw().Svg()))})");
                break;
            default:
                throw new InvalidOperationException($"no Markdown form for {block.GetType().Name}");
        }
        return sb.ToString();
    }

    private static string Inline(Text text, bool cell = false) => string.Concat(text.Spans.Select(s =>
    {
        var value = cell ? Cell(s.Value) : Escape(s.Value);
        return s.Value.Length == 0 ? "" : s.Tone switch
        {
            Tone.Code => Code(cell ? s.Value.Replace("|", "\\|", StringComparison.Ordinal) : s.Value),
            Tone.Strong or Tone.Bad => $"**{value}**",
            _ => value,
        };
    }));

    /// <summary>Code spans take their text literally; a backtick inside needs a longer fence.</summary>
    private static string Code(string s) => s.Contains('`', StringComparison.Ordinal) ? $"`` {s} ``" : $"`{s}`";

    // Markdown would read `*` and `<` in prose as emphasis or HTML, and regexes are full of them (GitHub leaves the
    // underscores inside names such as target_parameters alone, so they stay readable unescaped).
    private static string Escape(string s) => s.Replace("\\", "\\\\", StringComparison.Ordinal).Replace("*", "\\*", StringComparison.Ordinal)
        .Replace("<", "&lt;", StringComparison.Ordinal);

    private static string Cell(string s) => Escape(s).Replace("|", "\\|", StringComparison.Ordinal).Replace("\n", " ", StringComparison.Ordinal);
}
