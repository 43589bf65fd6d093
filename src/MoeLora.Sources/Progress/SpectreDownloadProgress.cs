using Spectre.Console;

namespace MoeLora.Sources.Progress;

/// <summary>
/// Shows each transfer as a Spectre.Console progress task. Spectre owns the render loop, so the caller starts it:
/// <code>
/// await AnsiConsole.Progress().StartAsync(async ctx =>
///     model = await new ModelResolver(settings with { Progress = new SpectreDownloadProgress(ctx) }).ResolveAsync(id, options));
/// </code>
/// </summary>
public sealed class SpectreDownloadProgress(ProgressContext context) : IDownloadProgress
{
    public IProgressBar Start(string label, long? totalBytes)
    {
        ProgressTask task = context.AddTask(Markup.Escape(label), maxValue: totalBytes is > 0 ? totalBytes.Value : 1);
        task.IsIndeterminate = totalBytes is null or <= 0;
        return new Bar(task);
    }

    private sealed class Bar(ProgressTask task) : IProgressBar
    {
        public void Advance(long bytes) => task.Increment(bytes);

        public void Dispose()
        {
            task.IsIndeterminate = false;
            task.Value = task.MaxValue;
            task.StopTask();
        }
    }
}
