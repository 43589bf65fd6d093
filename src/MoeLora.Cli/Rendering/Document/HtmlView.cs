using System.Globalization;
using System.Net;
using System.Text;

namespace MoeLora.Cli.Rendering.Document;

/// <summary>
/// The HTML view: one self-contained page (no scripts, nothing fetched), a <c>section</c> per section with its id,
/// charts as base64 SVG images.
/// </summary>
public static class HtmlView
{
    private const string Style =
        "body{font-family:'DejaVu Sans',system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}" +
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}" +
        "td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}.good{color:#067d17}.bad{color:#b00020}.warn{color:#8a5a00}" +
        "figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;padding:0 3px}";

    public static string Render(ReportDocument document)
    {
        var sb = new StringBuilder();
        sb.AppendLine("<!DOCTYPE html>");
        sb.AppendLine("<html lang=\"en\"><head><meta charset=\"utf-8\">");
        sb.AppendLine(CultureInfo.InvariantCulture, $"<title>{E(document.Title.Plain)}</title>");
        sb.AppendLine(CultureInfo.InvariantCulture, $"<style>{Style}</style>");
        sb.AppendLine("</head><body>");
        sb.AppendLine(CultureInfo.InvariantCulture, $"<h1>{E(document.Title.Plain)}</h1>");
        foreach (var section in document.Sections)
        {
            sb.AppendLine(CultureInfo.InvariantCulture, $"<section id=\"{section.Id}\"><h2>{Inline(section.Title)}</h2>");
            foreach (var block in section.Blocks) Render(sb, block);
            sb.AppendLine("</section>");
        }
        sb.AppendLine("</body></html>");
        return sb.ToString();
    }

    private static void Render(StringBuilder sb, Block block)
    {
        switch (block)
        {
            case Facts f:
                sb.AppendLine("<table>");
                foreach (var (label, value) in f.Rows) sb.AppendLine(CultureInfo.InvariantCulture, $"<tr><th>{E(label)}</th><td>{Inline(value)}</td></tr>");
                sb.AppendLine("</table>");
                break;
            case Paragraph p:
                sb.AppendLine(CultureInfo.InvariantCulture, $"<p>{Inline(p.Content)}</p>");
                break;
            case Table t:
                sb.Append("<table><tr>");
                foreach (var c in t.Columns) sb.Append(CultureInfo.InvariantCulture, $"<th{(c.Right ? " class=\"n\"" : "")}>{E(c.Header)}</th>");
                sb.AppendLine("</tr>");
                foreach (var row in t.Rows)
                {
                    sb.Append("<tr>");
                    for (var i = 0; i < row.Count; i++) sb.Append(CultureInfo.InvariantCulture, $"<td{(t.Columns[i].Right ? " class=\"n\"" : "")}>{Inline(row[i])}</td>");
                    sb.AppendLine("</tr>");
                }
                sb.AppendLine("</table>");
                break;
            case Items items:
                sb.AppendLine("<ul>");
                foreach (var i in items.Entries)
                    sb.AppendLine(CultureInfo.InvariantCulture, $"<li>{(i.Code is null ? "" : $"<strong>{E(i.Code)}</strong>: ")}{Inline(i.Content)}</li>");
                sb.AppendLine("</ul>");
                break;
            case Steps steps:
                sb.AppendLine("<ol>");
                foreach (var s in steps.Entries)
                    sb.AppendLine(CultureInfo.InvariantCulture,
                        $"<li><strong>{E(s.Title)}</strong>: {E(s.Detail)}{(s.Code is null ? "" : $"<br><code>{E(s.Code)}</code>")}{(s.Outcome is null ? "" : $"<br>→ {E(s.Outcome)}")}</li>");
                sb.AppendLine("</ol>");
                break;
            case Chart c:
                // The chart carries its own title; a caption repeating it would say it twice, so the caption is alt text.
                var b64 = Convert.ToBase64String(Encoding.UTF8.GetBytes(c.Draw().Svg()));
                sb.AppendLine(CultureInfo.InvariantCulture, $"<figure id=\"{c.Id}\"><img alt=\"{E(c.Caption)}\" src=\"data:image/svg+xml;base64,{b64}\"></figure>");
                break;
            default:
                throw new InvalidOperationException($"no HTML form for {block.GetType().Name}");
        }
    }

    private static string Inline(Text text) => string.Concat(text.Spans.Select(s => s.Tone switch
    {
        Tone.Strong => $"<strong>{E(s.Value)}</strong>",
        Tone.Good => $"<span class=\"good\">{E(s.Value)}</span>",
        Tone.Bad => $"<strong class=\"bad\">{E(s.Value)}</strong>",
        Tone.Warn => $"<span class=\"warn\">{E(s.Value)}</span>",
        Tone.Code => $"<code>{E(s.Value)}</code>",
        _ => E(s.Value),
    }));

    private static string E(string s) => WebUtility.HtmlEncode(s);
}
