using MoeLora.Core;
using MoeLora.Core.Analysis;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using Spectre.Console;
using static TorchSharp.torch;

namespace MoeLora.Cli.Infrastructure;

/// <summary>
/// The runtime commands' device and loading feedback. The device is selected before anything else touches TorchSharp,
/// because a CUDA request chooses which libtorch is loaded (TorchSharp's CUDA package, or an installed PyTorch's).
/// </summary>
internal static class RuntimeDevice
{
    const long QuietBelowBytes = 64L << 20;

    /// <summary>The TorchSharp device for --device; a CUDA run names its libtorch on stderr (one line).</summary>
    public static Device Select(string device)
    {
        Device dev;
        try { dev = DeviceSelector.Select(device); }
        catch (DeviceUnavailableException e) { throw new UserInputException(e.Message); }
        if (dev.type == TorchSharp.DeviceType.CUDA) Consoles.Error.WriteLine(
            $"device {device}: {TorchRuntime.LibTorchDescription}; {TorchRuntime.CudaAllocatorVariable}={Environment.GetEnvironmentVariable(TorchRuntime.CudaAllocatorVariable) ?? "(unset)"}");
        return dev;
    }

    /// <summary>
    /// Runs a checkpoint load with a progress bar on stderr when it is a terminal, else a plain line per 10% of the
    /// bytes of checkpoints from 64 MiB up (logs stay readable; stdout stays clean for JSON).
    /// </summary>
    public static T Load<T>(string what, Func<Action<LoadProgress>, T> load)
    {
        if (ReferenceEquals(Consoles.Error, Console.Error) && !Console.IsErrorRedirected)
        {
            var console = AnsiConsole.Create(new AnsiConsoleSettings { Out = new AnsiConsoleOutput(Console.Error) });
            T result = default!;
            console.Progress().AutoClear(true)
                .Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(),
                    new DownloadedColumn(), new RemainingTimeColumn())
                .Start(ctx =>
                {
                    var task = ctx.AddTask(Markup.Escape(what), maxValue: 1);
                    result = load(p =>
                    {
                        task.MaxValue = Math.Max(1, p.TotalBytes);
                        task.Value = p.Bytes;
                    });
                });
            return result;
        }
        int lastTenth = -1;
        return load(p =>
        {
            if (p.TotalBytes < QuietBelowBytes) return; // a small checkpoint loads in a blink: no log lines
            int tenth = p.TotalBytes == 0 ? 10 : (int)(10 * p.Bytes / p.TotalBytes);
            if (tenth == lastTenth) return;
            lastTenth = tenth;
            Consoles.Error.WriteLine($"{what}: {tenth * 10}% ({p.Tensors}/{p.TotalTensors} tensors, {Units.Bytes(p.Bytes)} of {Units.Bytes(p.TotalBytes)})");
        });
    }
}
