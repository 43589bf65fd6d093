using System.Globalization;
using System.Text;
using Spectre.Console;

namespace MoeLora.Cli.Infrastructure;

/// <summary>Creates consoles: colour only on a terminal (and never with NO_COLOR), plain text for files.</summary>
public static class Consoles
{
    /// <summary>Piped output has no width: give tables room rather than wrapping every cell at 80 columns.</summary>
    public const int PipeWidth = 140;

    private static IAnsiConsole? _out;
    private static TextWriter? _stdout;

    /// <summary>
    /// The console commands write to; tests replace it to capture output. Made on first use: a run that prints only
    /// JSON or Markdown never builds it (<see cref="VerbatimOut"/>).
    /// </summary>
    public static IAnsiConsole Out
    {
        get => _out ??= CreateStdout();
        set => _out = value;
    }

    public static TextWriter Error { get; set; } = Console.Error;

    /// <summary>Where text written verbatim (JSON, Markdown) goes: under <see cref="Out"/>, without trimming.</summary>
    public static TextWriter VerbatimOut => _out is null ? Stdout : Verbatim(_out);

    /// <summary>The writer under <paramref name="console"/>, without the trimming of trailing spaces.</summary>
    public static TextWriter Verbatim(IAnsiConsole console) =>
        console.Profile.Out.Writer is TrailingSpaceTrimmer t ? t.Inner : console.Profile.Out.Writer;

    /// <summary>
    /// Standard output. Redirected, one write to the pipe per call (Console.Out's own writer flushes every 256
    /// characters).
    /// </summary>
    private static TextWriter Stdout => _stdout ??= Console.IsOutputRedirected
        ? new StreamWriter(Console.OpenStandardOutput(), new UTF8Encoding(false), 1 << 16) { AutoFlush = true }
        : Console.Out;

    private static IAnsiConsole CreateStdout()
    {
        var redirected = Console.IsOutputRedirected;
        var noColor = !string.IsNullOrEmpty(Environment.GetEnvironmentVariable("NO_COLOR"));
        // Piped: no trailing padding either.
        var writer = redirected ? new TrailingSpaceTrimmer(Stdout) : Stdout;
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Ansi = redirected || noColor ? AnsiSupport.No : AnsiSupport.Detect,
            ColorSystem = redirected || noColor ? ColorSystemSupport.NoColors : ColorSystemSupport.Detect,
            Out = new AnsiConsoleOutput(writer),
        });
        // COLUMNS, when set, is the width (as POSIX tools read it); else the terminal's, or PipeWidth for a pipe.
        if (ColumnsVariable() is { } columns) console.Profile.Width = columns;
        else if (redirected) console.Profile.Width = PipeWidth;
        return console;
    }

    private static int? ColumnsVariable() =>
        int.TryParse(Environment.GetEnvironmentVariable("COLUMNS"), NumberStyles.None, CultureInfo.InvariantCulture, out var n) && n is >= 20 and <= 10_000 ? n : null;

    /// <summary>A console that renders into a string without escape codes or trailing spaces (for --output files).</summary>
    public static (IAnsiConsole Console, StringWriter Buffer) Plain(int width = 160)
    {
        var buffer = new StringWriter();
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Ansi = AnsiSupport.No,
            ColorSystem = ColorSystemSupport.NoColors,
            Out = new AnsiConsoleOutput(new TrailingSpaceTrimmer(buffer)),
            Interactive = InteractionSupport.No,
        });
        console.Profile.Width = width;
        return (console, buffer);
    }
}
