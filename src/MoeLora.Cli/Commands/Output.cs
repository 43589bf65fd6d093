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
        if (file is null) Consoles.Out.Profile.Out.Writer.Write(text);
        else AtomicFile.WriteAllText(file, text);
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
