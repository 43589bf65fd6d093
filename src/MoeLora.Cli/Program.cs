using Spectre.Console.Cli;

namespace MoeLora.Cli;

public static class Program
{
    public static int Main(string[] args)
    {
        var app = new CommandApp();
        app.Configure(config =>
        {
            config.SetApplicationName("moelora");
        });
        return app.Run(args);
    }
}
