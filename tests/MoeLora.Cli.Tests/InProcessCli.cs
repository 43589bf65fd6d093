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
}
