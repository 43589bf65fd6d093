namespace MoeLora.Sources.Tests.Support;

/// <summary>A download progress sink that records every bar: its label, total, bytes advanced and whether it was closed.</summary>
public sealed class RecordingProgress : Progress.IDownloadProgress
{
    public List<(string Label, long? Total, long Advanced, bool Disposed)> Bars { get; } = [];

    public Progress.IProgressBar Start(string label, long? totalBytes)
    {
        Bars.Add((label, totalBytes, 0, false));
        return new Bar(this, Bars.Count - 1);
    }

    private sealed class Bar(RecordingProgress owner, int index) : Progress.IProgressBar
    {
        public void Advance(long bytes) => owner.Bars[index] = owner.Bars[index] with { Advanced = owner.Bars[index].Advanced + bytes };

        public void Dispose() => owner.Bars[index] = owner.Bars[index] with { Disposed = true };
    }
}
