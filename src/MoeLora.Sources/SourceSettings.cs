using MoeLora.Sources.Progress;

namespace MoeLora.Sources;

/// <summary>
/// Everything the resolver takes from the outside world. Built once from the environment by
/// <see cref="FromEnvironment()"/> (same variables and defaults as huggingface_hub) and passed down explicitly,
/// so tests can point every path and URL at a temporary folder and a loopback server.
/// </summary>
public sealed record SourceSettings
{
    /// <summary>The hub cache folder (<c>HF_HUB_CACHE</c>, else <c>HF_HOME/hub</c>).</summary>
    public required string HubCache { get; init; }

    /// <summary>Base URL of the Hub without a trailing slash (<c>HF_ENDPOINT</c>).</summary>
    public string Endpoint { get; init; } = DefaultEndpoint;

    /// <summary>Bearer token, or null to send none.</summary>
    public string? Token { get; init; }

    /// <summary><c>HF_HUB_OFFLINE</c>: never make an HTTP request.</summary>
    public bool Offline { get; init; }

    /// <summary>Copy files into <c>snapshots/</c> instead of linking to <c>blobs/</c> (<c>HF_HUB_DISABLE_SYMLINKS</c>).</summary>
    public bool DisableSymlinks { get; init; }

    /// <summary>Limit for connecting and receiving response headers, and for each pause while reading a body.</summary>
    public TimeSpan RequestTimeout { get; init; } = TimeSpan.FromSeconds(10);

    /// <summary>How many times a 429 or 5xx answer is retried before giving up.</summary>
    public int MaxRetries { get; init; } = 5;

    /// <summary>First backoff delay when the server gives no <c>Retry-After</c>; doubles on each retry.</summary>
    public TimeSpan InitialBackoff { get; init; } = TimeSpan.FromSeconds(1);

    /// <summary>Upper bound on any single wait, including one asked for by <c>Retry-After</c>.</summary>
    public TimeSpan MaxBackoff { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>
    /// Bytes asked for by the first ranged read of a safetensors file. huggingface_hub uses 100 kB, enough for
    /// nearly every header; larger headers cost one more request.
    /// </summary>
    public int HeaderProbeBytes { get; init; } = 100_000;

    /// <summary>Files at least this large get a progress bar.</summary>
    public long ProgressThresholdBytes { get; init; } = 1 << 20;

    /// <summary>Where progress is shown; <see cref="NullDownloadProgress"/> shows nothing.</summary>
    public IDownloadProgress Progress { get; init; } = NullDownloadProgress.Instance;

    public string UserAgent { get; init; } = "moelora";

    public const string DefaultEndpoint = "https://huggingface.co";

    /// <summary>Reads the process environment and the user's home folder.</summary>
    public static SourceSettings FromEnvironment() =>
        FromEnvironment(
            name => Environment.GetEnvironmentVariable(name),
            Environment.GetFolderPath(Environment.SpecialFolder.UserProfile),
            path => File.Exists(path) ? File.ReadAllText(path) : null);

    /// <summary>
    /// Applies huggingface_hub's rules to the given variables: <c>HF_HOME</c> (default
    /// <c>$XDG_CACHE_HOME/huggingface</c> or <c>~/.cache/huggingface</c>), <c>HF_HUB_CACHE</c> (legacy
    /// <c>HUGGINGFACE_HUB_CACHE</c>), <c>HF_ENDPOINT</c>, <c>HF_TOKEN</c> (legacy <c>HUGGING_FACE_HUB_TOKEN</c>) then the
    /// token file (<c>HF_TOKEN_PATH</c>, default <c>HF_HOME/token</c>), <c>HF_HUB_DISABLE_IMPLICIT_TOKEN</c>,
    /// <c>HF_HUB_OFFLINE</c> / <c>TRANSFORMERS_OFFLINE</c>, <c>HF_HUB_DISABLE_SYMLINKS</c>, <c>HF_HUB_ETAG_TIMEOUT</c>.
    /// </summary>
    public static SourceSettings FromEnvironment(Func<string, string?> env, string home, Func<string, string?> readFile)
    {
        string? Get(string name) => env(name) is { Length: > 0 } v ? v : null;

        string hfHome = Get("HF_HOME")
            ?? Path.Combine(Get("XDG_CACHE_HOME") ?? Path.Combine(home, ".cache"), "huggingface");
        hfHome = ExpandHome(hfHome, home);
        string hubCache = ExpandHome(Get("HF_HUB_CACHE") ?? Get("HUGGINGFACE_HUB_CACHE") ?? Path.Combine(hfHome, "hub"), home);

        string? token = null;
        if (!IsTrue(Get("HF_HUB_DISABLE_IMPLICIT_TOKEN")))
        {
            token = Get("HF_TOKEN") ?? Get("HUGGING_FACE_HUB_TOKEN");
            if (token is null)
            {
                string tokenPath = ExpandHome(Get("HF_TOKEN_PATH") ?? Path.Combine(hfHome, "token"), home);
                token = readFile(tokenPath)?.Trim() is { Length: > 0 } t ? t : null;
            }
        }

        var settings = new SourceSettings
        {
            HubCache = hubCache,
            Endpoint = (Get("HF_ENDPOINT") ?? DefaultEndpoint).TrimEnd('/'),
            Token = token?.Trim(),
            Offline = IsTrue(Get("HF_HUB_OFFLINE")) || IsTrue(Get("TRANSFORMERS_OFFLINE")),
            DisableSymlinks = IsTrue(Get("HF_HUB_DISABLE_SYMLINKS")),
        };
        if (double.TryParse(Get("HF_HUB_ETAG_TIMEOUT"), System.Globalization.CultureInfo.InvariantCulture, out double seconds) && seconds > 0)
            settings = settings with { RequestTimeout = TimeSpan.FromSeconds(seconds) };
        return settings;
    }

    // huggingface_hub's _is_true: case-insensitive 1 / ON / YES / TRUE.
    internal static bool IsTrue(string? value) =>
        value is not null && value.Trim().ToUpperInvariant() is "1" or "ON" or "YES" or "TRUE";

    private static string ExpandHome(string path, string home) =>
        path == "~" ? home : path.StartsWith("~/", StringComparison.Ordinal) ? Path.Combine(home, path[2..]) : path;
}
