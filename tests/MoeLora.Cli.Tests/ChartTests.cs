using MoeLora.Cli.Commands;
using MoeLora.Cli.Rendering;
using MoeLora.Torch.Training;
using ScottPlot;

namespace MoeLora.Cli.Tests;

/// <summary>Properties of the charts (limits, ticks, panels, colours), checked on the ScottPlot objects rather than on pixels.</summary>
public sealed class ChartTests
{
    // Three MoE layers (decoder layers 1, 3, 5) of four experts; the largest |difference| is 0.3.
    private static readonly double[,] Diff = { { 0.1, -0.1, 0, 0 }, { 0.3, -0.2, -0.1, 0 }, { 0, 0, 0.05, -0.05 } };
    private static readonly string[] Layers = ["1", "3", "5"];

    private static (Plot Plot, ScottPlot.Plottables.Heatmap Heatmap, int Width, int Height) Heatmap()
    {
        var (plot, width, height) = RouterHeatmap.Build(Diff, Layers, "some-org/Some-MoE-Model-With-A-Long-Name-8x7B-Instruct-v0.1");
        plot.GetImage(width, height); // lay out and render once, as SavePng does
        return (plot, plot.GetPlottables<ScottPlot.Plottables.Heatmap>().Single(), width, height);
    }

    [Fact]
    public void Heatmap_limits_are_symmetric_about_zero()
    {
        var (_, heatmap, _, _) = Heatmap();
        Assert.Equal(-0.3, heatmap.ManualRange!.Value.Min, 12);
        Assert.Equal(0.3, heatmap.ManualRange!.Value.Max, 12);
        Assert.Equal(new ScottPlot.Range(-0.01, 0.01), RouterHeatmap.SymmetricRange(new double[2, 2]));
    }

    [Fact]
    public void Heatmap_colour_map_diverges_from_a_neutral_zero()
    {
        var map = new RouterHeatmap.Diverging();
        var zero = map.GetColor(0.5);
        Assert.Equal((255, 255, 255), (zero.R, zero.G, zero.B));
        var negative = map.GetColor(0);
        var positive = map.GetColor(1);
        Assert.True(negative.B > negative.R, "benign-leaning cells are blue");
        Assert.True(positive.R > positive.B, "harmful-leaning cells are red");
        // Equal distances from zero are equally strong: the lightness falls off symmetrically.
        static int Light(Color c) => c.R + c.G + c.B;
        Assert.InRange(Math.Abs(Light(map.GetColor(0.2)) - Light(map.GetColor(0.8))), 0, 60);
    }

    [Fact]
    public void Heatmap_ticks_sit_at_cell_centres_and_name_the_right_rows()
    {
        var (plot, _, width, height) = Heatmap();
        var x = plot.Axes.Bottom.TickGenerator.Ticks.Where(t => t.IsMajor).ToList();
        Assert.Equal([0.0, 1, 2, 3], x.Select(t => t.Position));
        Assert.Equal(["0", "1", "2", "3"], x.Select(t => t.Label));
        var y = plot.Axes.Left.TickGenerator.Ticks.Where(t => t.IsMajor).ToList();
        Assert.Equal(3, y.Count);
        Assert.All(y, t => Assert.Equal(Math.Round(t.Position), t.Position));
        // Each row tick names the layer whose cells are drawn there: the colour at (expert e, tick) is that of
        // Diff[row, e]. (Heatmap.GetValue ignores how rows are flipped, so the picture itself is asked.)
        using var bitmap = SkiaSharp.SKBitmap.Decode(plot.GetImage(width, height).GetImageBytes());
        var map = new RouterHeatmap.Diverging();
        foreach (var tick in y)
        {
            var row = Array.IndexOf(Layers, tick.Label);
            for (var e = 0; e < 4; e++)
            {
                var pixel = plot.GetPixel(new Coordinates(e, tick.Position));
                var drawn = bitmap.GetPixel((int)pixel.X, (int)pixel.Y);
                var expected = map.GetColor((Diff[row, e] + 0.3) / 0.6);
                Assert.True(Math.Abs(drawn.Red - expected.R) + Math.Abs(drawn.Green - expected.G) + Math.Abs(drawn.Blue - expected.B) < 12,
                    $"layer {tick.Label}, expert {e}: drawn {drawn}, expected {expected} for {Diff[row, e]}");
            }
        }
        var limits = plot.Axes.GetLimits();
        Assert.Equal((-0.5, 3.5, -0.5, 2.5), (limits.Left, limits.Right, limits.Bottom, limits.Top));
    }

    [Fact]
    public void Heatmap_has_a_labelled_colour_bar_and_a_title_that_fits()
    {
        var (plot, _, width, _) = Heatmap();
        var bar = plot.Axes.GetPanels().OfType<ScottPlot.Panels.ColorBar>().Single();
        Assert.Equal(RouterHeatmap.ColorBarLabel, bar.Label);
        // The title is centred over the data area; it is clipped when it is wider than the figure.
        using var paint = Paint.NewDisposablePaint();
        var title = plot.Axes.Title.Label.Measure(paint);
        Assert.True(title.Width < width - 40, $"title {title.Width:0} px in a {width} px figure");
        Assert.Contains("\n", plot.Axes.Title.Label.Text); // the model id on its own line
    }

    [Fact]
    public void Router_rows_are_labelled_with_their_decoder_layer()
    {
        Assert.Equal("12", RoutersCommand.LayerLabel("model.layers.12.mlp.experts"));
        Assert.Equal("experts", RoutersCommand.LayerLabel("experts"));
        Assert.Equal("3", RoutersCommand.LayerLabel("transformer.blocks.3.ffn.experts.mlp"));
        Assert.Equal("1 attn", RoutersCommand.LayerLabel("model.layers.1.self_attention.experts.input_linear"));
    }

    private static List<(string Label, List<(double X, double Y)> Points)> Curves()
    {
        var steps = Enumerable.Range(0, 50).Select(i => (double)i).ToList();
        return
        [
            ("retain loss", steps.Select(s => (s, 8.0 - s / 25)).ToList()),
            ("RR loss", steps.Select(s => (s, 0.6 - s / 100)).ToList()),
            ("CB cosine", steps.Select(s => (s, 0.9 - s / 60)).ToList()),
            ("c_retain / a", steps.Select(s => (s, s / 49)).ToList()),
            ("c_cb / a", steps.Select(s => (s, 1 - s / 49)).ToList()),
        ];
    }

    [Fact]
    public void Loss_curves_give_retain_loss_its_own_panel()
    {
        var figure = MetricsPlot.Build(Curves());
        figure.Render(MetricsPlot.Width, MetricsPlot.Height);
        var panels = figure.GetPlots();
        Assert.Equal(2, panels.Length);
        string[] Labels(Plot p) => p.GetPlottables<ScottPlot.Plottables.Scatter>().Select(s => s.LegendText).ToArray();
        Assert.Equal(["retain loss"], Labels(panels[0]));
        Assert.Equal(["RR loss", "CB cosine", "c_retain / a", "c_cb / a"], Labels(panels[1]));
        // The 0..1 curves keep a 0..1 scale instead of a sliver at the bottom of an 8-unit axis.
        var lower = panels[1].Axes.GetLimits();
        Assert.InRange(lower.Top - lower.Bottom, 0.9, 1.5);
        Assert.Equal(panels[0].Axes.GetLimits().Left, lower.Left, 9);
    }

    [Fact]
    public void Loss_curve_legends_sit_outside_the_data()
    {
        var figure = MetricsPlot.Build(Curves());
        foreach (var plot in figure.GetPlots())
        {
            Assert.False(plot.Legend.IsVisible); // the legend inside the data area is off ...
            Assert.Single(plot.Axes.GetPanels().OfType<ScottPlot.Panels.LegendPanel>()); // ... and one beside it is on
        }
    }
}

/// <summary>The report's own charts.</summary>
public sealed class ReportChartTests
{
    private static MoeLora.Core.Analysis.LoraReport Report(string id, params string[] targets)
    {
        Assert.True(MoeLora.Core.Catalog.ModelCatalog.TryGetConfigJson(id, out var json));
        var spec = MoeLora.Core.Architectures.ArchitectureRegistry.Build(MoeLora.Core.Config.ModelConfig.Parse(json, id), MoeLora.Core.Modules.Layout.V5);
        var lora = new MoeLora.Core.Peft.LoraConfig { R = 8, LoraAlpha = 16, TargetModules = MoeLora.Core.Peft.ModuleSelector.List(targets) };
        return MoeLora.Core.Analysis.LoraReport.Build(spec, lora, null, new MoeLora.Core.Analysis.ReportOptions { ModelId = id });
    }

    [Fact]
    public void Per_layer_chart_has_integer_ticks_and_ends_half_a_bar_past_the_layers()
    {
        var figure = HtmlCharts.ParametersPerLayer(Report("deepseek-ai/DeepSeek-V3", "o_proj", "down_proj"));
        figure.Plot.GetImage(figure.Width, figure.Height);
        var ticks = figure.Plot.Axes.Bottom.TickGenerator.Ticks.Where(t => t.IsMajor).ToList();
        Assert.All(ticks, t => Assert.Equal(Math.Round(t.Position), t.Position));
        Assert.All(ticks, t => Assert.InRange(t.Position, 0, 60));
        Assert.Equal(0, ticks[0].Position);
        var limits = figure.Plot.Axes.GetLimits();
        Assert.Equal((-0.5, 60.5), (limits.Left, limits.Right));
        // DeepSeek-V3's three dense layers get no expert adapters: their bars are lower than the MoE layers'.
        var bars = figure.Plot.GetPlottables<ScottPlot.Plottables.BarPlot>().Single().Bars.ToList();
        Assert.Equal(61, bars.Count);
        Assert.True(bars[0].Value < bars[3].Value);
    }

    [Fact]
    public void Every_report_chart_uses_the_page_font()
    {
        var report = Report("Qwen/Qwen3-30B-A3B", "q_proj", "down_proj");
        foreach (var figure in new[] { HtmlCharts.ParametersPerLayer(report), HtmlCharts.AdaptersByLocation(report), HtmlCharts.MemoryBreakdown(report.Training) })
        {
            Assert.Equal(HtmlCharts.FontName, figure.Plot.Axes.Title.Label.FontName);
            Assert.Equal(HtmlCharts.FontName, figure.Plot.Axes.Bottom.TickLabelStyle.FontName);
        }
    }
}
