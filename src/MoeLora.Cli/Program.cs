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
            config.AddCommand<MoeLora.Cli.Commands.TrainCommand>("train").WithDescription("Circuit-breaker (representation rerouting) LoRA training");
            config.AddCommand<MoeLora.Cli.Commands.EvalCommand>("eval").WithDescription("Rerouting and retain metrics with and without an adapter");
        });
        return app.Run(args);
    }
}
