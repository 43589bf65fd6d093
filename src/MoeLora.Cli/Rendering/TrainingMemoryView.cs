using System.Globalization;
using System.Text;
using MoeLora.Core.Analysis;
using MoeLora.Core.Memory;
using Spectre.Console;
using Spectre.Console.Rendering;

namespace MoeLora.Cli.Rendering;

/// <summary>The training-memory section, for the terminal and for Markdown.</summary>
public static class TrainingMemoryView
{
    public static string SetupLine(TrainingMemory m)
    {
        var s = m.Setup;
        var cb = s.Mode == TrainingMode.CircuitBreaker ? $", {m.LayersRun} blocks run" : "";
        return $"{TrainingSetup.Name(s.Mode)} step, batch {s.BatchSize} × seq {s.SeqLength}, {s.DType.Name()}, quantization {TrainingSetup.Name(s.Quantization)}, " +
               $"gradient checkpointing {(s.GradientCheckpointing ? "on" : "off")}, {TrainingSetup.Name(s.Attention)} attention, " +
               $"{s.Gpus} GPU{(s.Gpus == 1 ? "" : "s")} ({TrainingSetup.Name(s.Sharding)}) of {Units.Bytes(s.GpuMemoryBytes)}{cb}";
    }

    public static IEnumerable<IRenderable> Render(TrainingMemory m)
    {
        yield return new Rule("[bold]Training memory (per GPU)[/]").LeftJustified();
        yield return new Markup(Markup.Escape(SetupLine(m)) + "\n");
        var table = new Table().Border(TableBorder.Rounded).AddColumn("term").AddColumn(new TableColumn("bytes").RightAligned())
            .AddColumn(new TableColumn("share").RightAligned()).AddColumn("formula");
        var total = Math.Max(1, m.PerGpuBytes);
        foreach (var t in m.Terms)
            table.AddRow(Markup.Escape(t.Name), Units.Bytes(t.Bytes), (100.0 * t.Bytes / total).ToString("0.0", CultureInfo.InvariantCulture) + "%", Markup.Escape(t.Formula));
        table.AddRow("[bold]peak[/]", $"[bold]{Units.Bytes(m.PerGpuBytes)}[/]", "100%", Markup.Escape($"at {m.Phase}"));
        yield return table;
        var colour = m.Fits ? "green" : "red";
        yield return new Markup($"[{colour}]{Markup.Escape(m.Verdict)}[/]\n");
        if (!m.Fits && m.Fixes.Count > 0)
        {
            var fixes = new Table().Border(TableBorder.Rounded).AddColumn("change").AddColumn(new TableColumn("per GPU").RightAligned()).AddColumn("fits");
            foreach (var f in m.Fixes) fixes.AddRow(Markup.Escape(f.Change), Units.Bytes(f.PerGpuBytes), f.Fits ? "[green]yes[/]" : "[red]no[/]");
            yield return fixes;
        }
    }

    public static string Markdown(TrainingMemory m)
    {
        var sb = new StringBuilder();
        sb.AppendLine().AppendLine("## Training memory (per GPU)").AppendLine();
        sb.AppendLine(SetupLine(m) + ".").AppendLine();
        sb.AppendLine("| term | bytes | share | formula | source |").AppendLine("|---|---:|---:|---|---|");
        var total = Math.Max(1, m.PerGpuBytes);
        foreach (var t in m.Terms)
            sb.AppendLine(CultureInfo.InvariantCulture, $"| `{t.Name}` | {Units.Bytes(t.Bytes)} | {100.0 * t.Bytes / total:0.0}% | {Esc(t.Formula)} | {Esc(t.Source)} |");
        sb.AppendLine(CultureInfo.InvariantCulture, $"| **peak** | **{Units.Bytes(m.PerGpuBytes)}** | 100% | at {m.Phase} | |").AppendLine();
        sb.AppendLine(CultureInfo.InvariantCulture, $"**{(m.Fits ? "Fits" : "Does not fit")}**: {Esc(m.Verdict)}");
        if (!m.Fits && m.Fixes.Count > 0)
        {
            sb.AppendLine().AppendLine("| change | per GPU | fits |").AppendLine("|---|---:|---|");
            foreach (var f in m.Fixes) sb.AppendLine(CultureInfo.InvariantCulture, $"| `{f.Change}` | {Units.Bytes(f.PerGpuBytes)} | {(f.Fits ? "yes" : "no")} |");
        }
        return sb.ToString();
    }

    private static string Esc(string s) => s.Replace("|", "\\|", StringComparison.Ordinal);
}
