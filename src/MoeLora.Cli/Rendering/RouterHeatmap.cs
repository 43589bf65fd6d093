using System.Globalization;
using ScottPlot;

namespace MoeLora.Cli.Rendering;

/// <summary>
/// The routers heatmap: harmful − benign selection frequency per MoE layer (rows) and expert (columns). The
/// difference is signed, so the colour map diverges from a neutral white at zero, with limits symmetric about zero
/// so that equal frequencies look the same in every picture; cells sit on integer coordinates with a tick at each
/// cell centre (thinned to at most <see cref="MaxTicks"/> per axis).
/// </summary>
public static class RouterHeatmap
{
    public const int MaxTicks = 32;

    public const string ColorBarLabel = "harmful − benign selection frequency";

    /// <param name="diff">[row, expert] differences; row r is the MoE module labelled <paramref name="rowLabels"/>[r].</param>
    public static ChartFigure Build(double[,] diff, IReadOnlyList<string> rowLabels, string model)
    {
        int rows = diff.GetLength(0), experts = diff.GetLength(1);
        var plot = new Plot();
        plot.Font.Set(HtmlCharts.FontName);
        var heatmap = plot.Add.Heatmap(diff);
        heatmap.Colormap = new Diverging();
        heatmap.ManualRange = SymmetricRange(diff);
        // Cells centred on integer coordinates; ScottPlot draws row 0 (the first MoE layer) at the top, like the
        // table, so row r is centred on y = rows - 1 - r.
        heatmap.CellAlignment = Alignment.MiddleCenter;
        var bar = plot.Add.ColorBar(heatmap);
        bar.Label = ColorBarLabel;
        plot.Title($"Expert selection, harmful − benign\n{model}");
        plot.XLabel("expert");
        plot.YLabel("MoE layer");
        var x = Thinned(experts);
        plot.Axes.Bottom.SetTicks(x.Select(i => (double)i).ToArray(), x.Select(i => i.ToString(CultureInfo.InvariantCulture)).ToArray());
        var y = Thinned(rows);
        plot.Axes.Left.SetTicks(y.Select(RowCentre).ToArray(), y.Select(i => rowLabels[i]).ToArray());
        plot.Axes.SetLimits(-0.5, experts - 0.5, -0.5, rows - 0.5);
        // Wide enough for the title and labels; one row of cells is never thinner than 14 px.
        var width = Math.Max(900, 24 * experts + 260);
        var height = Math.Max(360, 22 * rows + 200);
        return new ChartFigure(plot, width, height);

        double RowCentre(int r) => rows - 1 - r;
    }

    /// <summary>±the largest |difference| (±0.01 when all are zero, so the colour bar still has a scale).</summary>
    public static ScottPlot.Range SymmetricRange(double[,] diff)
    {
        var max = diff.Cast<double>().Select(Math.Abs).DefaultIfEmpty(0).Max();
        if (max == 0) max = 0.01;
        return new ScottPlot.Range(-max, max);
    }

    public static void Write(string path, double[,] diff, IReadOnlyList<string> rowLabels, string model)
    {
        var figure = Build(diff, rowLabels, model);
        Infrastructure.AtomicFile.Write(path, figure.SavePng, ".png");
    }

    private static int[] Thinned(int n)
    {
        var step = Math.Max(1, (int)Math.Ceiling(n / (double)MaxTicks));
        return Enumerable.Range(0, n).Where(i => i % step == 0).ToArray();
    }

    /// <summary>
    /// ColorBrewer's RdBu, blue for negative (benign selects more) through white at zero to red for positive
    /// (harmful selects more).
    /// </summary>
    public sealed class Diverging : IColormap
    {
        private static readonly (double At, Color Color)[] Stops =
        [
            (0.0, Color.FromHex("#2166ac")), (0.25, Color.FromHex("#92c5de")), (0.5, Color.FromHex("#ffffff")),
            (0.75, Color.FromHex("#f4a582")), (1.0, Color.FromHex("#b2182b")),
        ];

        public string Name => "RdBu (diverging)";

        public Color GetColor(double position)
        {
            position = double.IsNaN(position) ? 0.5 : Math.Clamp(position, 0, 1);
            for (var i = 1; i < Stops.Length; i++)
            {
                if (position > Stops[i].At) continue;
                var (a, ca) = Stops[i - 1];
                var (b, cb) = Stops[i];
                var t = (position - a) / (b - a);
                return new Color(Mix(ca.R, cb.R, t), Mix(ca.G, cb.G, t), Mix(ca.B, cb.B, t));
            }
            return Stops[^1].Color;
        }

        private static byte Mix(byte a, byte b, double t) => (byte)Math.Round(a + (b - a) * t);
    }
}
