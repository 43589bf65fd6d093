namespace MoeLora.Sources.Progress;

/// <summary>Receives progress of long transfers. Injected through <see cref="SourceSettings.Progress"/>.</summary>
public interface IDownloadProgress
{
    /// <summary>Starts a bar for one transfer; dispose the result when the transfer ends, whether or not it succeeded.</summary>
    /// <param name="label">What is transferred, e.g. <c>org/name: model-00001-of-00004.safetensors</c>.</param>
    /// <param name="totalBytes">Expected size, or null when unknown.</param>
    IProgressBar Start(string label, long? totalBytes);
}

/// <summary>One running transfer.</summary>
public interface IProgressBar : IDisposable
{
    void Advance(long bytes);
}

/// <summary>Shows nothing; the default, and what tests use.</summary>
public sealed class NullDownloadProgress : IDownloadProgress, IProgressBar
{
    public static readonly NullDownloadProgress Instance = new();

    public IProgressBar Start(string label, long? totalBytes) => this;

    public void Advance(long bytes) { }

    public void Dispose() { }
}
