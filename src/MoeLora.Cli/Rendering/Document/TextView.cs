using MoeLora.Cli.Rendering;
using Spectre.Console;
using Spectre.Console.Rendering;

namespace MoeLora.Cli.Rendering.Document;

/// <summary>
/// The terminal view: a rule per section, facts as a two-column grid, rounded tables. Charts are left out (their
/// numbers are in the tables next to them), and so are <see cref="Column.Wide"/> columns. Tables fit the width without
/// splitting words (<see cref="FitTable"/>).
/// </summary>
public static class TextView
{
    public static IEnumerable<IRenderable> Render(ReportDocument document)
    {
        yield return new Rule(Markup(document.Title)).LeftJustified();
        foreach (var r in document.Sections.SelectMany((s, i) => Render(s, heading: i > 0))) yield return r;
    }

    /// <param name="heading">False for the first section, which sits under the document's own rule.</param>
    public static IEnumerable<IRenderable> Render(Section section, bool heading = true)
    {
        if (heading)
        {
            var title = section.Tone == Tone.Warn
                ? $"[bold yellow]{Escape(section.Title.Plain)}[/]"
                : Markup(section.Title.Spans is [{ Tone: Tone.Plain } only] ? new Text(only.Value, Tone.Strong) : section.Title);
            yield return new Rule(title).LeftJustified();
        }
        foreach (var block in section.Blocks)
            if (Render(block) is { } r) yield return r;
    }

    private static IRenderable? Render(Block block) => block switch
    {
        Facts f => Grid(f),
        Paragraph p => new Markup(Markup(p.Content) + "\n"),
        Table t => Table(t),
        Items items => new Markup(string.Concat(items.Entries.Select(i =>
            (i.Marker.Length > 0 ? $"{Markup(new Text(i.Marker, i.Tone))} " : "") + Markup(i.Content) + "\n"))),
        Steps steps => new WidthMarkup(width => string.Concat(steps.Entries.Select((s, n) =>
            $"{n + 1}. [bold]{Escape(s.Title)}[/]: {Escape(s.Detail)}" +
            (s.Code is null ? "" : "\n" + Escape(CodeWrap.Wrap(s.Code, "   ", width))) +
            (s.Outcome is null ? "" : $"\n   → {Escape(s.Outcome)}") + "\n"))),
        Chart => null,
        _ => throw new InvalidOperationException($"no terminal form for {block.GetType().Name}"),
    };

    private static Grid Grid(Facts facts)
    {
        var grid = new Grid().AddColumn().AddColumn();
        foreach (var (label, value) in facts.Rows) grid.AddRow(Escape(label), Markup(value));
        return grid;
    }

    private static FitTable Table(Table t)
    {
        var shown = t.Columns.Select((c, i) => (c, i)).Where(x => !x.c.Wide).ToList();
        return new FitTable(shown.Select(x => new FitColumn(x.c.Header, x.c.Right, x.c.Sparse)).ToList(),
            t.Rows.Select(row => (IReadOnlyList<string>)shown.Select(x => Markup(row[x.i])).ToList()));
    }

    /// <summary>Spectre markup for text: colour for good/bad/warn, bold for strong; code is plain in a terminal.</summary>
    public static string Markup(Text text) => string.Concat(text.Spans.Select(s => s.Tone switch
    {
        Tone.Strong => $"[bold]{Escape(s.Value)}[/]",
        Tone.Good => $"[green]{Escape(s.Value)}[/]",
        Tone.Bad => $"[red]{Escape(s.Value)}[/]",
        Tone.Warn => $"[yellow]{Escape(s.Value)}[/]",
        _ => Escape(s.Value),
    }));

    private static string Escape(string s) => Spectre.Console.Markup.Escape(s);
}
