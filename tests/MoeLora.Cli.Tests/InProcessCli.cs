using MoeLora.Cli.Infrastructure;

namespace MoeLora.Cli.Tests;

/// <summary>Runs <c>moelora</c> in this process with stderr captured (callers sit in the "cli" collection, since Consoles is static).</summary>
internal static class InProcessCli
{
    public static (int Code, string Error) Run(params string[] args)
    {
        var err = new StringWriter();
        var old = Consoles.Error;
        Consoles.Error = err;
        try { return (Program.Main(args), err.ToString()); }
        finally { Consoles.Error = old; }
    }

    /// <summary>Runs with stdout captured too, on a plain console of <paramref name="width"/> columns.</summary>
    public static (int Code, string Stdout, string Error) RunCapturing(int width, params string[] args)
    {
        var saved = Consoles.Out;
        var (console, buffer) = Consoles.Plain(width);
        Consoles.Out = console;
        try
        {
            var (code, err) = Run(args);
            return (code, buffer.ToString(), err);
        }
        finally { Consoles.Out = saved; }
    }
}
