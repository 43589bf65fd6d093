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

    private static readonly JsonWriterOptions IndentedWriter = new() { Indented = true };

    /// <summary>
    /// Indented JSON and a line break. Written as UTF-8 straight to a file or a pipe (no intermediate string: a report
    /// of DeepSeek-V3 is about 150 kB, and its start-up cost is mostly memory first touched); the same text as
    /// <see cref="JsonNode.ToJsonString"/> with indentation.
    /// </summary>
    public static void Json(JsonNode node, string? file)
    {
        if (file is not null)
        {
            AtomicFile.Write(file, temp =>
            {
                using var stream = File.Create(temp);
                WriteUtf8(node, stream);
            });
            return;
        }
        if (Consoles.VerbatimOut is StreamWriter { BaseStream: var stdout } writer)
        {
            writer.Flush();
            WriteUtf8(node, stdout);
            return;
        }
        Text(node.ToJsonString(Indented) + "\n", null);
    }

    private static void WriteUtf8(JsonNode node, Stream stream)
    {
        var chunks = new ChunkedStreamWriter(stream);
        using (var json = new Utf8JsonWriter(chunks, IndentedWriter)) node.WriteTo(json);
        chunks.Flush();
        stream.Write("\n"u8);
        stream.Flush();
    }

    public static void Text(string text, string? file)
    {
        if (file is null) Consoles.VerbatimOut.Write(text);
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
