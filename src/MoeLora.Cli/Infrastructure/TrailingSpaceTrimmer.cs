using System.Text;

namespace MoeLora.Cli.Infrastructure;

/// <summary>
/// A text writer that drops spaces at the end of every line: Spectre pads table cells, grids and rules to the console
/// width, which is noise in a file or a pipe (diffs, grep, editors flag it). Spaces are held back until something
/// other than a line break follows them, so text inside a line is never changed.
/// </summary>
public sealed class TrailingSpaceTrimmer(TextWriter inner) : TextWriter
{
    private int _pendingSpaces;

    /// <summary>The writer underneath, for output written verbatim (JSON, Markdown).</summary>
    public TextWriter Inner { get; } = inner;

    public override Encoding Encoding => Inner.Encoding;

    public override void Write(char value)
    {
        switch (value)
        {
            case ' ':
                _pendingSpaces++;
                return;
            case '\n' or '\r':
                _pendingSpaces = 0;
                break;
            default:
                FlushSpaces();
                break;
        }
        Inner.Write(value);
    }

    public override void Write(string? value) => Write(value.AsSpan());

    public override void Write(char[] buffer, int index, int count) => Write(buffer.AsSpan(index, count));

    public override void Write(ReadOnlySpan<char> value)
    {
        // Whole runs at once (one write to the stream per call, not one per character).
        var text = new StringBuilder(value.Length + _pendingSpaces);
        foreach (var c in value)
        {
            if (c == ' ') { _pendingSpaces++; continue; }
            if (c is not ('\n' or '\r')) text.Append(' ', _pendingSpaces);
            _pendingSpaces = 0;
            text.Append(c);
        }
        if (text.Length > 0) Inner.Write(text.ToString());
    }

    public override void Flush() => Inner.Flush();

    private void FlushSpaces()
    {
        if (_pendingSpaces == 0) return;
        Inner.Write(new string(' ', _pendingSpaces));
        _pendingSpaces = 0;
    }
}
