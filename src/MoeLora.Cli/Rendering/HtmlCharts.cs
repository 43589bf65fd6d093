using MoeLora.Core.Analysis;
using MoeLora.Core.Memory;
using MoeLora.Core.Modules;
using ScottPlot;

namespace MoeLora.Cli.Rendering;

/// <summary>A chart drawn with ScottPlot at its intended size: SVG for the HTML and Markdown reports, PNG for files.</summary>
public sealed record ChartFigure(Plot Plot, int Width, int Height)
{
    public string Svg() => Plot.GetSvgXml(Width, Height);

    public void SavePng(string path) => Plot.SavePng(path, Width, Height);
}

/// <summary>The report's charts, drawn by ScottPlot in one font (the page's).</summary>
public static class HtmlCharts
{
    private const int Width = 900;
    private const int Height = 420;

    /// <summary>The one chart font, also the report page's first choice.</summary>
    public const string FontName = "DejaVu Sans";

    /// <summary>Horizontal bars: GiB per memory term at the per-GPU peak.</summary>
    public static ChartFigure MemoryBreakdown(TrainingMemory m) =>
        HorizontalBars($"Per-GPU peak {Units.Bytes(m.PerGpuBytes)} ({m.Phase})", "GiB",
            m.Terms.Select(t => (t.Name, t.Bytes / (double)(1L << 30))).ToList());

    /// <summary>Bars: adapters per module location.</summary>
    public static ChartFigure AdaptersByLocation(LoraReport report)
    {
        var rows = report.ByLocation().Select(x => (x.Location.Label(), (double)x.Adapters)).ToList();
        return VerticalBars("Adapters by location", "adapters", rows);
    }

    /// <summary>Bars: LoRA parameters per decoder layer (millions).</summary>
    public static ChartFigure ParametersPerLayer(LoraReport report)
    {
        var layers = (int)report.Spec.NumHiddenLayers;
        var perLayer = new double[layers];
        foreach (var t in report.Plan.Targets.Where(t => t.Layer is { } l && l < layers && t.Location != ModuleLocation.Vision && t.Location != ModuleLocation.Projector))
            perLayer[t.Layer!.Value] += t.NumParameters / 1e6;
        var plt = new Plot();
        var bars = plt.Add.Bars(perLayer);
        bars.Color = Colors.SteelBlue;
        plt.Title("LoRA parameters per decoder layer");
        plt.XLabel("layer");
        plt.YLabel("parameters (M)");
        plt.Axes.Margins(bottom: 0);
        // Layers are integers 0..L-1: ticks only there, and the axis ends half a bar past the first and last layer
        // (ScottPlot's automatic limits ran from -2 to L).
        var step = Math.Max(1, (int)Math.Ceiling(layers / 16.0));
        var ticks = Enumerable.Range(0, layers).Where(i => i % step == 0).ToArray();
        plt.Axes.Bottom.SetTicks(ticks.Select(i => (double)i).ToArray(), ticks.Select(i => i.ToString(System.Globalization.CultureInfo.InvariantCulture)).ToArray());
        plt.Axes.SetLimitsX(-0.5, Math.Max(0.5, layers - 0.5));
        return Figure(plt);
    }

    /// <summary>One font for every chart, the page's sans-serif, so text in the charts matches the report.</summary>
    private static ChartFigure Figure(Plot plt, int width = Width, int height = Height)
    {
        plt.Font.Set(FontName);
        return new ChartFigure(plt, width, height);
    }

    private static ChartFigure VerticalBars(string title, string yLabel, IReadOnlyList<(string Label, double Value)> rows)
    {
        var plt = new Plot();
        var bars = rows.Select((r, i) => new Bar { Position = i, Value = r.Value, FillColor = Palette(i) }).ToList();
        plt.Add.Bars(bars);
        plt.Axes.Bottom.SetTicks(rows.Select((_, i) => (double)i).ToArray(), rows.Select(r => r.Label).ToArray());
        plt.Title(title);
        plt.YLabel(yLabel);
        plt.Axes.Margins(bottom: 0);
        return Figure(plt);
    }

    private static ChartFigure HorizontalBars(string title, string xLabel, IReadOnlyList<(string Label, double Value)> rows)
    {
        var plt = new Plot();
        var bars = rows.Select((r, i) => new Bar { Position = rows.Count - 1 - i, Value = r.Value, FillColor = Palette(i) }).ToList();
        var plot = plt.Add.Bars(bars);
        plot.Horizontal = true;
        plt.Axes.Left.SetTicks(rows.Select((_, i) => (double)(rows.Count - 1 - i)).ToArray(), rows.Select(r => r.Label).ToArray());
        plt.Title(title);
        plt.XLabel(xLabel);
        plt.Axes.Margins(left: 0);
        return Figure(plt, Width, Math.Max(Height, 40 * rows.Count + 120));
    }

    private static Color Palette(int i) => new ScottPlot.Palettes.Category10().GetColor(i);
}
