using Spectre.Console;

namespace MoeLora.Cli.Infrastructure;

/// <summary>Creates consoles: colour only on a terminal (and never with NO_COLOR), plain text for files.</summary>
public static class Consoles
{
    /// <summary>The console commands write to; tests replace it to capture output.</summary>
    public static IAnsiConsole Out { get; set; } = CreateStdout();

    public static TextWriter Error { get; set; } = Console.Error;

    private static IAnsiConsole CreateStdout()
    {
        var redirected = Console.IsOutputRedirected;
        var noColor = !string.IsNullOrEmpty(Environment.GetEnvironmentVariable("NO_COLOR"));
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Ansi = redirected || noColor ? AnsiSupport.No : AnsiSupport.Detect,
            ColorSystem = redirected || noColor ? ColorSystemSupport.NoColors : ColorSystemSupport.Detect,
            Out = new AnsiConsoleOutput(Console.Out),
        });
        // Piped output has no width; give tables room rather than wrapping every cell at 80 columns.
        if (redirected) console.Profile.Width = 140;
        return console;
    }

    /// <summary>A console that renders into a string without escape codes (for --output files).</summary>
    public static (IAnsiConsole Console, StringWriter Buffer) Plain(int width = 160)
    {
        var buffer = new StringWriter();
        var console = AnsiConsole.Create(new AnsiConsoleSettings
        {
            Ansi = AnsiSupport.No,
            ColorSystem = ColorSystemSupport.NoColors,
            Out = new AnsiConsoleOutput(buffer),
            Interactive = InteractionSupport.No,
        });
        console.Profile.Width = width;
        return (console, buffer);
    }
}
