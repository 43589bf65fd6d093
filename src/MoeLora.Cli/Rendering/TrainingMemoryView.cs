using MoeLora.Cli.Rendering.Document;
using MoeLora.Core.Memory;
using Spectre.Console.Rendering;

namespace MoeLora.Cli.Rendering;

/// <summary>The training-memory section on its own, for commands that print only it (plan) or quote its setup (diff).</summary>
public static class TrainingMemoryView
{
    public static string SetupLine(TrainingMemory m) => ReportDocumentBuilder.SetupLine(m);

    public static IEnumerable<IRenderable> Render(TrainingMemory m) => TextView.Render(ReportDocumentBuilder.TrainingMemory(m));

    public static string Markdown(TrainingMemory m) => MarkdownView.Render(ReportDocumentBuilder.TrainingMemory(m));
}
