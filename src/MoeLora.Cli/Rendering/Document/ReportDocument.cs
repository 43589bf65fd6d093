namespace MoeLora.Cli.Rendering.Document;

/// <summary>
/// A report as content, before any format: the sections, facts, tables, warnings, recommendations and charts that
/// the text, Markdown, HTML and JSON views render. Built once (<see cref="ReportDocumentBuilder"/>), so a view can
/// change how a section looks but cannot leave one out.
/// </summary>
public sealed record ReportDocument(Text Title, IReadOnlyList<Section> Sections);

/// <param name="Id">Stable anchor (the HTML section id, the JSON <c>sections[].id</c>).</param>
/// <param name="Json">
/// Where the section's data sits in the JSON report (a dotted path such as <c>lora.matching</c>), so the JSON view,
/// which keeps the <c>moelora.report/1</c> data layout, still lists every section and a test can check it is there.
/// </param>
/// <param name="Content">
/// The section's blocks, built on first use: the JSON view needs only the id, title and data path, so a JSON report
/// skips building the tables (a measurable part of a cold start).
/// </param>
public sealed record Section(string Id, Text Title, string Json, Func<IReadOnlyList<Block>> Content, Tone Tone = Tone.Plain)
{
    private IReadOnlyList<Block>? blocks;

    public Section(string Id, Text Title, string Json, IReadOnlyList<Block> Blocks, Tone Tone = Tone.Plain)
        : this(Id, Title, Json, () => Blocks, Tone)
    {
    }

    public IReadOnlyList<Block> Blocks => blocks ??= Content();
}

/// <summary>How a piece of text should stand out; each view maps it to its own means (colour, bold, code).</summary>
public enum Tone
{
    Plain,
    Strong,
    Good,
    Bad,
    Warn,
    Code,
}

/// <summary>A run of text in one tone.</summary>
public sealed record Span(string Value, Tone Tone = Tone.Plain);

/// <summary>Text made of spans; a plain string converts to it.</summary>
public sealed record Text(IReadOnlyList<Span> Spans)
{
    public static readonly Text Empty = new([]);

    public Text(string value, Tone tone = Tone.Plain) : this([new Span(value, tone)]) { }

    public static implicit operator Text(string value) => new(value);

    /// <summary>The words without tones (what JSON, alt text and titles use).</summary>
    public string Plain => string.Concat(Spans.Select(s => s.Value));

    public static Text Of(params Span[] spans) => new(spans);

    public override string ToString() => Plain;
}

/// <summary>One piece of a section.</summary>
public abstract record Block;

/// <summary>Label/value pairs (model facts, adapter facts, hidden-state memory).</summary>
public sealed record Facts(IReadOnlyList<(string Label, Text Value)> Rows) : Block;

/// <summary>A sentence or two.</summary>
public sealed record Paragraph(Text Content) : Block;

/// <param name="Right">Numbers: right-aligned.</param>
/// <param name="Wide">
/// A column of explanation (e.g. the source a memory term follows) that the terminal view leaves out to keep its
/// tables within the window; every other view shows it.
/// </param>
/// <param name="Sparse">
/// A column that is often empty (a module location no target reaches): the terminal view leaves it out when no row has
/// a value in it ("·" counts as none); every other view shows it.
/// </param>
public sealed record Column(string Header, bool Right = false, bool Wide = false, bool Sparse = false);

public sealed record Table(IReadOnlyList<Column> Columns, IReadOnlyList<IReadOnlyList<Text>> Rows) : Block;

/// <summary>An unnumbered list (warnings, checkpoint problems), each item with an optional code such as <c>experts_missed</c>.</summary>
public sealed record Items(IReadOnlyList<Item> Entries) : Block;

/// <param name="Marker">What the terminal prints before the item (<c>!</c>, <c>?</c>), in the item's tone.</param>
public sealed record Item(Text Content, string? Code = null, string Marker = "!", Tone Tone = Tone.Warn);

/// <summary>A numbered list of recommendations: title, why, the exact LoraConfig and what it trains.</summary>
public sealed record Steps(IReadOnlyList<Step> Entries) : Block;

/// <param name="Code">The configuration to use, as code (e.g. <c>LoraConfig(...)</c>).</param>
/// <param name="Outcome">What the change gives, re-planned (e.g. <c>trainable params: 26,214,400</c>).</param>
public sealed record Step(string Title, string Detail, string? Code = null, string? Outcome = null);

/// <summary>A chart, drawn only by the views that show pictures (the terminal shows the same numbers as tables).</summary>
/// <param name="Id">The HTML figure id.</param>
/// <param name="Draw">Draws the chart when a view needs it.</param>
public sealed record Chart(string Id, string Caption, Func<ChartFigure> Draw) : Block;
