using MoeLora.Sources.Safetensors;

namespace MoeLora.Sources.Tests.Support;

/// <summary>A temporary folder removed at the end of a test.</summary>
public sealed class TempDir : IDisposable
{
    public TempDir() => Directory.CreateDirectory(Path);

    public string Path { get; } = System.IO.Path.Combine(System.IO.Path.GetTempPath(), "moelora-sources-" + Guid.NewGuid().ToString("N"));

    public string Combine(params string[] parts) => System.IO.Path.Combine([Path, .. parts]);

    public void Dispose()
    {
        try { Directory.Delete(Path, recursive: true); } catch (IOException) { } catch (UnauthorizedAccessException) { }
    }
}

public static class TestEnv
{
    public static string DataDir => Path.Combine(AppContext.BaseDirectory, "Data");

    public static string TinyDir(string modelType) => Path.Combine(DataDir, "hf-tiny", modelType, "model");

    public static IEnumerable<string> TinyModelTypes =>
        Directory.GetDirectories(Path.Combine(DataDir, "hf-tiny")).Select(Path.GetFileName).Order(StringComparer.Ordinal)!;

    /// <summary>Settings pointed at a fake Hub and a private cache, with timeouts small enough for tests.</summary>
    public static SourceSettings Settings(string cache, FakeHub? hub = null, string? token = null) => new()
    {
        HubCache = cache,
        Endpoint = hub?.Endpoint ?? "http://127.0.0.1:9",
        Token = token,
        // The product's default: a loaded 2-core CI machine running test projects side by side has kept the local fake
        // Hub from answering within 2 s. Tests of the timeout itself set their own (300 ms against a delayed answer).
        RequestTimeout = TimeSpan.FromSeconds(10),
        InitialBackoff = TimeSpan.FromMilliseconds(10),
        MaxBackoff = TimeSpan.FromSeconds(2),
        MaxRetries = 3,
    };

    /// <summary>One line per tensor plus metadata, to compare headers read in different ways.</summary>
    public static string Describe(Checkpoint checkpoint) =>
        string.Join('\n', checkpoint.Files.Select(f =>
            $"{f.Name} header={f.Header.HeaderLength} data={f.Header.DataLength} meta={string.Join(',', f.Header.Metadata.OrderBy(p => p.Key).Select(p => p.Key + "=" + p.Value))}"))
        + "\n" + string.Join('\n', checkpoint.Tensors.Select(t => $"{t.File}:{t.Tensor} @{t.Tensor.DataBegin}-{t.Tensor.DataEnd}"));
}
