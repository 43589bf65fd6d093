using Spectre.Console;
using Spectre.Console.Rendering;

namespace MoeLora.Cli.Rendering;

/// <summary>A column of a <see cref="FitTable"/>.</summary>
/// <param name="Sparse">Left out of the terminal view when no row has a value in it (every cell empty or "·").</param>
public sealed record FitColumn(string Header, bool Right = false, bool Sparse = false);

/// <summary>
/// A terminal table that fits the width it is given without splitting a word (a module name, a shape) across lines:
/// Spectre shrinks columns below their longest word when a table is too wide, which breaks identifiers
/// (<c>gate_pro</c>/<c>j</c>). Columns with nothing in them are dropped; if every column's longest word fits, each
/// column gets at least that and the rest of the width goes to the columns that wrap; if even that is too wide, each
/// row is printed as a heading and one "header: value" line per cell (stacked).
/// </summary>
public sealed class FitTable : IRenderable
{
    private const string None = "·";
    private readonly IReadOnlyList<FitColumn> _columns;
    private readonly IReadOnlyList<IReadOnlyList<string>> _rows;
    private readonly TableBorder _border;

    /// <param name="rows">Cells as Spectre markup, one per column.</param>
    public FitTable(IReadOnlyList<FitColumn> columns, IEnumerable<IReadOnlyList<string>> rows, TableBorder? border = null)
    {
        _columns = columns;
        _rows = rows.ToList();
        _border = border ?? TableBorder.Rounded;
        if (_rows.FirstOrDefault(r => r.Count != columns.Count) is { } bad)
            throw new ArgumentException($"a row has {bad.Count} cells for {columns.Count} columns", nameof(rows));
    }

    /// <summary>A table of plain text (escaped here), all columns left-aligned.</summary>
    public static FitTable Plain(IReadOnlyList<string> headers, IEnumerable<IReadOnlyList<string>> rows, TableBorder? border = null) =>
        new(headers.Select(h => new FitColumn(h)).ToList(), rows.Select(r => (IReadOnlyList<string>)r.Select(Markup.Escape).ToList()), border);

    public Measurement Measure(RenderOptions options, int maxWidth) => Layout(maxWidth).Measure(options, maxWidth);

    public IEnumerable<Segment> Render(RenderOptions options, int maxWidth) => Layout(maxWidth).Render(options, maxWidth);

    /// <summary>The columns shown: sparse ones with a value in some row, and every other one.</summary>
    private List<int> Shown() => Enumerable.Range(0, _columns.Count)
        .Where(i => !_columns[i].Sparse || _rows.Any(r => !IsEmpty(r[i])))
        .ToList();

    private static bool IsEmpty(string markup) => Markup.Remove(markup).Trim() is "" or None;

    private IRenderable Layout(int maxWidth)
    {
        var shown = Shown();
        if (shown.Count == 0) return new Text("");
        var plain = _rows.Select(r => shown.Select(i => Markup.Remove(r[i])).ToList()).ToList();
        var headers = shown.Select(i => _columns[i].Header).ToList();
        var min = new int[shown.Count];
        var max = new int[shown.Count];
        for (int c = 0; c < shown.Count; c++)
        {
            foreach (var text in plain.Select(r => r[c]).Append(headers[c]))
            {
                foreach (var line in text.Split('\n'))
                {
                    max[c] = Math.Max(max[c], Width(line));
                    foreach (var word in line.Split(' ')) min[c] = Math.Max(min[c], Width(word));
                }
            }
        }
        // Each column takes its width plus a space of padding either side and one border character; plus the left edge.
        var chrome = 3 * shown.Count + 1;
        if (max.Sum() + chrome <= maxWidth) return Table(shown, null);
        if (min.Sum() + chrome > maxWidth) return Stacked(shown, headers);
        // Every longest word fits: give each column that, then share the rest fairly (max-min): a column that needs
        // less than an equal share gets all it needs and stops wrapping; the wide ones split what is left.
        var widths = (int[])min.Clone();
        var spare = maxWidth - chrome - min.Sum();
        var open = Enumerable.Range(0, widths.Length).Where(c => max[c] > min[c]).ToList();
        while (open.Count > 0 && spare > 0)
        {
            var share = spare / open.Count;
            var satisfied = open.Where(c => max[c] - widths[c] <= share).ToList();
            if (satisfied.Count == 0)
            {
                foreach (var c in open) widths[c] += share;
                // The remainder goes to the widest wants, one column each.
                foreach (var c in open.OrderByDescending(c => max[c] - widths[c]).Take(spare - share * open.Count)) widths[c]++;
                break;
            }
            foreach (var c in satisfied)
            {
                spare -= max[c] - widths[c];
                widths[c] = max[c];
                open.Remove(c);
            }
        }
        return Table(shown, widths);
    }

    private Table Table(List<int> shown, int[]? widths)
    {
        var table = new Table().Border(_border);
        for (int c = 0; c < shown.Count; c++)
        {
            var spec = _columns[shown[c]];
            var column = new TableColumn(Markup.Escape(spec.Header));
            if (spec.Right) column.RightAligned();
            if (widths is not null) column.Width = widths[c];
            table.AddColumn(column);
        }
        foreach (var row in _rows) table.AddRow(shown.Select(i => row[i]).ToArray());
        return table;
    }

    private Rows Stacked(List<int> shown, List<string> headers)
    {
        var blocks = new List<IRenderable>();
        foreach (var row in _rows)
        {
            var lines = new List<string> { $"[bold]{row[shown[0]]}[/]" };
            for (int c = 1; c < shown.Count; c++)
                if (!IsEmpty(row[shown[c]])) lines.Add($"  {Markup.Escape(headers[c])}: {row[shown[c]]}");
            blocks.Add(new Markup(string.Join("\n", lines)));
        }
        return new Rows(blocks);
    }

    private static int Width(string text) => text.GetCellWidth();
}
