using System.Text.Json;
using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
using Spectre.Console;
using Spectre.Console.Rendering;

namespace MoeLora.Cli.Commands;

/// <summary>Sends a command's result to the terminal or, atomically, to --output.</summary>
public static class Output
{
    private static readonly JsonSerializerOptions Indented = new() { WriteIndented = true };

    public static void Json(JsonNode node, string? file) => Text(node.ToJsonString(Indented) + "\n", file);

    public static void Text(string text, string? file)
    {
        if (file is null) Consoles.Verbatim(Consoles.Out).Write(text);
        else AtomicFile.WriteAllText(file, text);
    }

    /// <summary>Writes a command's result in the requested format; each view is built only when asked for.</summary>
    public static void Result(Options.OutputFormat format, string? file, Func<JsonNode> json, Func<IEnumerable<IRenderable>> text, Func<string> markdown)
    {
        switch (format)
        {
            case Options.OutputFormat.Json: Json(json(), file); break;
            case Options.OutputFormat.Markdown: Text(markdown(), file); break;
            default: Renderables(text(), file); break;
        }
    }

    public static void Renderables(IEnumerable<IRenderable> items, string? file)
    {
        if (file is null)
        {
            foreach (var r in items) Consoles.Out.Write(r);
            return;
        }
        var (console, buffer) = Consoles.Plain();
        foreach (var r in items) console.Write(r);
        AtomicFile.WriteAllText(file, buffer.ToString());
    }
}
