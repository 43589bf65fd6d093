using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using System.Security.Cryptography;
using System.Text;

namespace MoeLora.Sources.Tests.Support;

/// <summary>One request the fake servers received.</summary>
public sealed record ServedRequest(string Server, string Path, string? Range, string? Authorization, int Status, long BodyBytes, string Method = "GET");

/// <summary>A repository on the fake Hub.</summary>
public sealed class FakeRepo(string id, string commit)
{
    public string Id => id;
    public string Commit => commit;
    public bool Gated { get; set; }
    public Dictionary<string, byte[]> Files { get; } = new(StringComparer.Ordinal);
    public Dictionary<string, string> Branches { get; } = new(StringComparer.Ordinal) { ["main"] = commit };

    public FakeRepo With(string path, byte[] content) { Files[path] = content; return this; }
    public FakeRepo With(string path, string content) => With(path, Encoding.UTF8.GetBytes(content));
}

/// <summary>
/// A Hub-like server on loopback with a second server as its file CDN, both plain <see cref="HttpListener"/>s.
/// Resolve URLs behave like the Hub's: X-Repo-Commit, ETag / X-Linked-Etag, 302 to the CDN for LFS files
/// (*.safetensors), X-Error-Code on errors, 401 for anonymous access to missing or gated repos. Both servers honour
/// Range, log every request and count the body bytes they send. Faults (status codes, delays, ignored ranges,
/// cut-off bodies) are scripted per test.
/// </summary>
public sealed class FakeHub : IDisposable
{
    public const string GoodToken = "hf_good";
    public const string UngrantedToken = "hf_ungranted";
    public const string InvalidToken = "hf_invalid";

    private readonly Server _hub;
    private readonly Server _cdn;
    private readonly ConcurrentDictionary<string, FakeRepo> _repos = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<string, string> _renamed = new(StringComparer.Ordinal);
    private readonly ConcurrentQueue<ServedRequest> _log = new();
    private readonly object _faultLock = new();
    private readonly List<Fault> _faults = [];

    public FakeHub()
    {
        _hub = new Server("hub", HandleHubAsync);
        _cdn = new Server("cdn", HandleCdnAsync);
    }

    public string Endpoint => _hub.BaseUrl;

    public IReadOnlyList<ServedRequest> Requests => _log.ToArray();

    /// <summary>When true the CDN ignores Range and sends whole files.</summary>
    public bool CdnIgnoresRange { get; set; }

    public FakeRepo AddRepo(string id, string? commit = null)
    {
        var repo = new FakeRepo(id, commit ?? Convert.ToHexStringLower(SHA1.HashData(Encoding.UTF8.GetBytes(id))));
        _repos[id] = repo;
        return repo;
    }

    /// <summary>Like a renamed repository on the Hub: the old id answers with a relative 307 to the new one.</summary>
    public void Rename(string oldId, string newId) => _renamed[oldId] = newId;

    /// <summary>Answers the next <paramref name="times"/> hub requests whose path contains <paramref name="pathPart"/> with a status.</summary>
    public void FailNext(string pathPart, int status, int times, string? retryAfter = null) =>
        AddFault(new Fault(pathPart, times) { Status = status, RetryAfter = retryAfter });

    /// <summary>Delays the next matching hub requests before answering normally.</summary>
    public void DelayNext(string pathPart, TimeSpan delay, int times = int.MaxValue) =>
        AddFault(new Fault(pathPart, times) { Delay = delay });

    /// <summary>Sends only the first bytes of the next matching body, then drops the connection.</summary>
    public void TruncateNext(string pathPart, int bytes, int times = 1) =>
        AddFault(new Fault(pathPart, times) { TruncateAfter = bytes });

    /// <summary>Body bytes served for paths containing <paramref name="pathPart"/>, on either server.</summary>
    public long BytesServed(string pathPart) => _log.Where(r => r.Path.Contains(pathPart, StringComparison.Ordinal)).Sum(r => r.BodyBytes);

    public static string GitBlobSha1(byte[] content) =>
        Convert.ToHexStringLower(SHA1.HashData([.. Encoding.ASCII.GetBytes($"blob {content.Length}\0"), .. content]));

    public static string Sha256(byte[] content) => Convert.ToHexStringLower(SHA256.HashData(content));

    private void AddFault(Fault fault)
    {
        lock (_faultLock) _faults.Add(fault);
    }

    private Fault? TakeFault(string path, bool head = false)
    {
        lock (_faultLock)
        {
            // A HEAD has no body to cut short, so truncation faults wait for the GET.
            Fault? fault = _faults.FirstOrDefault(f => f.Remaining > 0 && path.Contains(f.PathPart, StringComparison.Ordinal)
                && !(head && f.TruncateAfter is not null));
            if (fault is not null) fault.Remaining--;
            return fault;
        }
    }

    private async Task HandleHubAsync(HttpListenerContext context)
    {
        HttpListenerRequest request = context.Request;
        HttpListenerResponse response = context.Response;
        string path = request.RawUrl!.Split('?')[0];
        Fault? fault = TakeFault(path, request.HttpMethod == "HEAD");
        if (fault?.Delay is TimeSpan delay) await Task.Delay(delay);
        if (fault?.Status is int status)
        {
            if (fault.RetryAfter is not null) response.Headers["Retry-After"] = fault.RetryAfter;
            await FinishAsync(context, "hub", status, []);
            return;
        }

        string[] segments = path.TrimStart('/').Split('/').Select(Uri.UnescapeDataString).ToArray();
        int resolveAt = Array.IndexOf(segments, "resolve");
        if (resolveAt < 1 || segments.Length < resolveAt + 3)
        {
            await FinishAsync(context, "hub", 404, []);
            return;
        }
        string repoId = string.Join('/', segments[..resolveAt]);
        string revision = segments[resolveAt + 1];
        string file = string.Join('/', segments[(resolveAt + 2)..]);
        string? token = request.Headers["Authorization"] is { } auth && auth.StartsWith("Bearer ", StringComparison.Ordinal) ? auth[7..] : null;

        if (_renamed.TryGetValue(repoId, out string? newId))
        {
            context.Response.Headers["Location"] = "/" + newId + path[(1 + repoId.Length)..];
            await FinishAsync(context, "hub", 307, []);
            return;
        }
        if (token == InvalidToken)
        {
            await ErrorAsync(context, 401, null, "Invalid credentials in Authorization header");
            return;
        }
        if (!_repos.TryGetValue(repoId, out FakeRepo? repo))
        {
            // Like the Hub: anonymous requests cannot tell a missing repo from a private one.
            await ErrorAsync(context, token is null ? 401 : 404, "RepoNotFound", "Repository not found");
            return;
        }
        if (repo.Gated && token != GoodToken)
        {
            await ErrorAsync(context, token is null ? 401 : 403, "GatedRepo", $"Access to model {repo.Id} is restricted.");
            return;
        }
        string? commit = revision == repo.Commit ? repo.Commit : repo.Branches.GetValueOrDefault(revision);
        if (commit is null)
        {
            await ErrorAsync(context, 404, "RevisionNotFound", "Invalid rev id");
            return;
        }
        response.Headers["X-Repo-Commit"] = commit;
        if (!repo.Files.TryGetValue(file, out byte[]? content))
        {
            await ErrorAsync(context, 404, "EntryNotFound", "Entry not found");
            return;
        }
        if (file.EndsWith(".safetensors", StringComparison.Ordinal))
        {
            string sha = Sha256(content);
            response.Headers["X-Linked-Etag"] = $"\"{sha}\"";
            response.Headers["X-Linked-Size"] = content.Length.ToString(System.Globalization.CultureInfo.InvariantCulture);
            response.Headers["Location"] = $"{_cdn.BaseUrl}/blobs/{sha}?X-Amz-Signature=fake";
            await FinishAsync(context, "hub", 302, []);
            return;
        }
        response.Headers["ETag"] = $"\"{GitBlobSha1(content)}\"";
        await ServeContentAsync(context, "hub", content, ignoreRange: false, fault?.TruncateAfter);
    }

    private async Task HandleCdnAsync(HttpListenerContext context)
    {
        string path = context.Request.RawUrl!.Split('?')[0];
        string sha = path.Split('/')[^1];
        byte[]? content = _repos.Values.SelectMany(r => r.Files.Values).FirstOrDefault(c => Sha256(c) == sha);
        if (content is null)
        {
            await FinishAsync(context, "cdn", 404, []);
            return;
        }
        Fault? fault = TakeFault(path);
        await ServeContentAsync(context, "cdn", content, CdnIgnoresRange, fault?.TruncateAfter);
    }

    private async Task ServeContentAsync(HttpListenerContext context, string server, byte[] content, bool ignoreRange, int? truncateAfter)
    {
        string? range = context.Request.Headers["Range"];
        if (range is null || ignoreRange)
        {
            await FinishAsync(context, server, 200, content, truncateAfter);
            return;
        }
        // Only the single-range forms clients send: bytes=a-b and bytes=a-.
        string[] bounds = range["bytes=".Length..].Split('-');
        long start = long.Parse(bounds[0], System.Globalization.CultureInfo.InvariantCulture);
        long end = bounds[1].Length == 0 ? content.Length - 1 : Math.Min(long.Parse(bounds[1], System.Globalization.CultureInfo.InvariantCulture), content.Length - 1);
        if (start >= content.Length)
        {
            context.Response.Headers["Content-Range"] = $"bytes */{content.Length}";
            await FinishAsync(context, server, 416, []);
            return;
        }
        context.Response.Headers["Content-Range"] = $"bytes {start}-{end}/{content.Length}";
        await FinishAsync(context, server, 206, content[(int)start..(int)(end + 1)], truncateAfter);
    }

    private async Task ErrorAsync(HttpListenerContext context, int status, string? code, string message)
    {
        if (code is not null) context.Response.Headers["X-Error-Code"] = code;
        context.Response.Headers["X-Error-Message"] = message;
        await FinishAsync(context, "hub", status, Encoding.UTF8.GetBytes($"{{\"error\":\"{message}\"}}"));
    }

    private async Task FinishAsync(HttpListenerContext context, string server, int status, byte[] body, int? truncateAfter = null)
    {
        HttpListenerResponse response = context.Response;
        long sent = 0;
        try
        {
            response.StatusCode = status;
            response.ContentLength64 = body.Length;
            // HEAD: the headers of a GET (Content-Length included) and no body.
            int length = context.Request.HttpMethod == "HEAD" ? 0 : truncateAfter is int cut ? Math.Min(cut, body.Length) : body.Length;
            // Write in slices so a client that stops reading early is noticed, and count what actually left.
            for (int offset = 0; offset < length; offset += 16384)
            {
                int slice = Math.Min(16384, length - offset);
                await response.OutputStream.WriteAsync(body.AsMemory(offset, slice));
                sent += slice;
            }
            if (truncateAfter is not null && length < body.Length && context.Request.HttpMethod != "HEAD")
            {
                await response.OutputStream.FlushAsync();
                response.Abort();
                return;
            }
            response.Close();
        }
        catch (Exception ex) when (ex is HttpListenerException or IOException or ObjectDisposedException or InvalidOperationException)
        {
            // The client hung up, which it may do once it has the bytes it wanted.
            try { response.Abort(); } catch (ObjectDisposedException) { }
        }
        finally
        {
            _log.Enqueue(new ServedRequest(server, context.Request.RawUrl!.Split('?')[0], context.Request.Headers["Range"],
                context.Request.Headers["Authorization"], status, sent, context.Request.HttpMethod));
        }
    }

    public void Dispose()
    {
        _hub.Dispose();
        _cdn.Dispose();
    }

    private sealed class Fault(string pathPart, int times)
    {
        public string PathPart => pathPart;
        public int Remaining { get; set; } = times;
        public int? Status { get; init; }
        public string? RetryAfter { get; init; }
        public TimeSpan? Delay { get; init; }
        public int? TruncateAfter { get; init; }
    }

    /// <summary>One HttpListener on a free loopback port, handling each request on the thread pool.</summary>
    private sealed class Server : IDisposable
    {
        private readonly HttpListener _listener;
        private readonly Func<HttpListenerContext, Task> _handler;

        public Server(string name, Func<HttpListenerContext, Task> handler)
        {
            _handler = handler;
            for (int attempt = 0; ; attempt++)
            {
                int port = FreePort();
                var listener = new HttpListener();
                listener.Prefixes.Add($"http://127.0.0.1:{port}/");
                try
                {
                    listener.Start();
                    _listener = listener;
                    BaseUrl = $"http://127.0.0.1:{port}";
                    break;
                }
                catch (HttpListenerException) when (attempt < 10)
                {
                    // Another process took the port between probing and binding; try another.
                    listener.Close();
                }
            }
            _ = Task.Run(LoopAsync);
        }

        public string BaseUrl { get; } = "";

        private async Task LoopAsync()
        {
            while (_listener.IsListening)
            {
                HttpListenerContext context;
                try
                {
                    context = await _listener.GetContextAsync();
                }
                catch (Exception ex) when (ex is HttpListenerException or ObjectDisposedException or InvalidOperationException)
                {
                    return;
                }
                _ = Task.Run(() => _handler(context));
            }
        }

        private static int FreePort()
        {
            var probe = new TcpListener(IPAddress.Loopback, 0);
            probe.Start();
            int port = ((IPEndPoint)probe.LocalEndpoint).Port;
            probe.Stop();
            return port;
        }

        public void Dispose() => _listener.Close();
    }
}
