using System.Net;
using System.Net.Http.Headers;
using MoeLora.Sources.Progress;

namespace MoeLora.Sources.Hub;

/// <summary>
/// GETs Hub resolve URLs. Redirects are followed here rather than by <see cref="HttpClient"/> so that the token is
/// sent only to the Hub's own host (never to the file CDN it redirects to) while the Range header is kept on every
/// hop. 429 and 5xx answers are retried with exponential backoff, honouring <c>Retry-After</c>; every wait for
/// the network is bounded by <see cref="SourceSettings.RequestTimeout"/>.
/// </summary>
internal sealed class HubClient : IDisposable
{
    private const int MaxRedirects = 10;

    private readonly SourceSettings _settings;
    private readonly Uri _endpoint;
    private readonly HttpClient _http;

    public HubClient(SourceSettings settings)
    {
        _settings = settings;
        _endpoint = new Uri(settings.Endpoint.TrimEnd('/') + "/");
        _http = new HttpClient(new SocketsHttpHandler
        {
            AllowAutoRedirect = false,
            AutomaticDecompression = DecompressionMethods.None,
            ConnectTimeout = settings.RequestTimeout,
            UseCookies = false,
        })
        {
            // Our own per-step timeouts apply; HttpClient's would also cut off long, healthy downloads.
            Timeout = Timeout.InfiniteTimeSpan,
        };
    }

    public string Endpoint => _settings.Endpoint.TrimEnd('/');

    /// <summary>
    /// GETs a file (or a byte range of it). Returns the final successful response; throws <see cref="HubException"/>
    /// for every failure, after retries where they make sense.
    /// </summary>
    public async Task<HubResponse> GetAsync(HubFile file, long? rangeFrom, long? rangeTo, CancellationToken cancellationToken)
    {
        Uri url = file.ResolveUrl(Endpoint);
        for (int attempt = 1; ; attempt++)
        {
            (HttpResponseMessage response, HubFileMetadata metadata) = await FollowRedirectsAsync(url, file, rangeFrom, rangeTo, HttpMethod.Get, cancellationToken);
            if (response.IsSuccessStatusCode || response.StatusCode == HttpStatusCode.RequestedRangeNotSatisfiable)
                return new HubResponse(response, metadata, _settings.RequestTimeout, file);

            if (HubErrors.IsRetryable(response.StatusCode) && attempt <= _settings.MaxRetries)
            {
                TimeSpan delay = RetryDelay(response, attempt);
                response.Dispose();
                await Task.Delay(delay, cancellationToken);
                continue;
            }

            using (response)
                throw HubErrors.FromResponse(response, file, Endpoint, _settings.Token is not null, attempt);
        }
    }

    /// <summary>
    /// What the Hub says about a file without fetching it, like huggingface_hub's <c>get_hf_file_metadata</c>: a HEAD
    /// request to the resolve URL that follows redirects on the Hub's own host (renamed repositories) but stops at
    /// the redirect to the file CDN, whose answer already carries <c>X-Linked-Etag</c> and <c>X-Linked-Size</c>.
    /// Retries and errors as <see cref="GetAsync"/>.
    /// </summary>
    public async Task<HubFileMetadata> HeadAsync(HubFile file, CancellationToken cancellationToken)
    {
        Uri url = file.ResolveUrl(Endpoint);
        for (int attempt = 1; ; attempt++)
        {
            (HttpResponseMessage response, HubFileMetadata metadata) = await FollowRedirectsAsync(url, file, null, null, HttpMethod.Head, cancellationToken);
            using (response)
            {
                if (response.IsSuccessStatusCode || IsRedirect(response.StatusCode)) return metadata;
                if (HubErrors.IsRetryable(response.StatusCode) && attempt <= _settings.MaxRetries)
                {
                    await Task.Delay(RetryDelay(response, attempt), cancellationToken);
                    continue;
                }
                throw HubErrors.FromResponse(response, file, Endpoint, _settings.Token is not null, attempt);
            }
        }
    }

    private async Task<(HttpResponseMessage, HubFileMetadata)> FollowRedirectsAsync(
        Uri url, HubFile file, long? rangeFrom, long? rangeTo, HttpMethod method, CancellationToken cancellationToken)
    {
        var metadata = new HubFileMetadata(null, null, null);
        for (int hop = 0; ; hop++)
        {
            using var request = new HttpRequestMessage(method, url);
            request.Headers.UserAgent.ParseAdd(_settings.UserAgent);
            // Sizes and ranges must refer to the stored bytes, not a compressed transfer.
            request.Headers.AcceptEncoding.ParseAdd("identity");
            if (rangeFrom is not null) request.Headers.Range = new RangeHeaderValue(rangeFrom, rangeTo);
            bool hubHost = IsHubHost(url);
            if (hubHost && _settings.Token is not null)
                request.Headers.Authorization = new AuthenticationHeaderValue("Bearer", _settings.Token);

            HttpResponseMessage response = await SendAsync(request, file, cancellationToken);
            if (hubHost) metadata = Merge(metadata, response);

            if (!IsRedirect(response.StatusCode)) return (response, metadata);
            // A HEAD stops where the Hub hands over to another host: the redirect itself describes the file.
            if (method == HttpMethod.Head && response.Headers.Location is { } next
                && !IsHubHost(next.IsAbsoluteUri ? next : new Uri(url, next)))
                return (response, metadata);
            using (response)
            {
                Uri? location = response.Headers.Location;
                if (location is null)
                    throw new HubException(HubErrorKind.Protocol, $"{Endpoint} redirected the request for {file} without a Location.", (int)response.StatusCode);
                if (hop >= MaxRedirects)
                    throw new HubException(HubErrorKind.Protocol, $"{Endpoint} redirected the request for {file} more than {MaxRedirects} times.", (int)response.StatusCode);
                url = location.IsAbsoluteUri ? location : new Uri(url, location);
                if (url.Scheme != Uri.UriSchemeHttp && url.Scheme != Uri.UriSchemeHttps)
                    throw new HubException(HubErrorKind.Protocol, $"{Endpoint} redirected the request for {file} to a non-HTTP address.", (int)response.StatusCode);
            }
        }
    }

    private async Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, HubFile file, CancellationToken cancellationToken)
    {
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        timeout.CancelAfter(_settings.RequestTimeout);
        try
        {
            return await _http.SendAsync(request, HttpCompletionOption.ResponseHeadersRead, timeout.Token);
        }
        catch (OperationCanceledException ex) when (!cancellationToken.IsCancellationRequested)
        {
            throw new HubException(HubErrorKind.Timeout,
                $"{request.RequestUri!.GetLeftPart(UriPartial.Authority)} did not answer within {_settings.RequestTimeout.TotalSeconds:0.#} s while fetching {file}.", inner: ex);
        }
        catch (HttpRequestException ex)
        {
            throw new HubException(HubErrorKind.Unreachable,
                $"cannot reach {request.RequestUri!.GetLeftPart(UriPartial.Authority)} to fetch {file}: {ex.Message}", inner: ex);
        }
    }

    // Only the Hub itself gets the token: same scheme, host and port as the configured endpoint.
    private bool IsHubHost(Uri url) =>
        url.Scheme == _endpoint.Scheme && string.Equals(url.Authority, _endpoint.Authority, StringComparison.OrdinalIgnoreCase);

    private TimeSpan RetryDelay(HttpResponseMessage response, int attempt)
    {
        RetryConditionHeaderValue? retryAfter = response.Headers.RetryAfter;
        TimeSpan delay = retryAfter?.Delta
            ?? (retryAfter?.Date is DateTimeOffset date ? date - DateTimeOffset.UtcNow : (TimeSpan?)null)
            ?? _settings.InitialBackoff * Math.Pow(2, attempt - 1);
        return delay < TimeSpan.Zero ? TimeSpan.Zero : delay > _settings.MaxBackoff ? _settings.MaxBackoff : delay;
    }

    private static bool IsRedirect(HttpStatusCode status) =>
        status is HttpStatusCode.MovedPermanently or HttpStatusCode.Found or HttpStatusCode.SeeOther
            or HttpStatusCode.TemporaryRedirect or HttpStatusCode.PermanentRedirect;

    // Keeps the first value seen along the redirect chain: the Hub's answer describes the file, later hops don't.
    private static HubFileMetadata Merge(HubFileMetadata known, HttpResponseMessage response)
    {
        string? commit = known.Commit ?? First(response, "X-Repo-Commit");
        string? etag = known.Etag ?? NormalizeEtag(First(response, "X-Linked-Etag") ?? response.Headers.ETag?.Tag);
        long? size = known.Size
            ?? (long.TryParse(First(response, "X-Linked-Size"), out long linked) ? linked : (long?)null)
            ?? (response.StatusCode == HttpStatusCode.OK ? response.Content.Headers.ContentLength : null);
        return new HubFileMetadata(commit, etag, size);
    }

    private static string? First(HttpResponseMessage response, string name) =>
        response.Headers.TryGetValues(name, out IEnumerable<string>? values) ? values.FirstOrDefault() : null;

    // huggingface_hub's _normalize_etag: drop a weak marker and the quotes.
    internal static string? NormalizeEtag(string? etag)
    {
        if (string.IsNullOrWhiteSpace(etag)) return null;
        string value = etag.Trim();
        if (value.StartsWith("W/", StringComparison.Ordinal)) value = value[2..];
        return value.Trim('"');
    }

    public void Dispose() => _http.Dispose();
}

/// <summary>A successful Hub response whose body has not been read yet.</summary>
internal sealed class HubResponse(HttpResponseMessage response, HubFileMetadata metadata, TimeSpan idleTimeout, HubFile file) : IDisposable
{
    public HttpResponseMessage Message => response;

    public HubFileMetadata Metadata => metadata;

    public HubFile File => file;

    /// <summary>The whole file's length, from <c>Content-Range</c> or, for a full answer, <c>Content-Length</c>.</summary>
    public long? FileLength =>
        response.Content.Headers.ContentRange?.Length
        ?? (response.StatusCode == HttpStatusCode.OK ? response.Content.Headers.ContentLength : null);

    /// <summary>Reads at most <paramref name="maxBytes"/> of the body and stops, even if the server sends more.</summary>
    public async Task<byte[]> ReadUpToAsync(int maxBytes, CancellationToken cancellationToken)
    {
        // Grow as bytes arrive instead of trusting a declared length: a lying server cannot make us allocate.
        using var buffer = new MemoryStream();
        await CopyAsync(buffer, maxBytes, NullDownloadProgress.Instance, cancellationToken);
        return buffer.ToArray();
    }

    /// <summary>Copies the body to <paramref name="destination"/>, reporting progress; returns the bytes copied.</summary>
    public Task<long> CopyToAsync(Stream destination, IProgressBar progress, CancellationToken cancellationToken) =>
        CopyAsync(destination, long.MaxValue, progress, cancellationToken);

    private async Task<long> CopyAsync(Stream destination, long maxBytes, IProgressBar progress, CancellationToken cancellationToken)
    {
        byte[] chunk = new byte[81920];
        long total = 0;
        using var timeout = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        try
        {
            timeout.CancelAfter(idleTimeout);
            await using Stream body = await response.Content.ReadAsStreamAsync(timeout.Token);
            while (total < maxBytes)
            {
                // The timeout bounds each pause, not the whole transfer, so slow but steady downloads finish.
                timeout.CancelAfter(idleTimeout);
                int read = await body.ReadAsync(chunk.AsMemory(0, (int)Math.Min(chunk.Length, maxBytes - total)), timeout.Token);
                if (read == 0) break;
                await destination.WriteAsync(chunk.AsMemory(0, read), cancellationToken);
                total += read;
                progress.Advance(read);
            }
            return total;
        }
        catch (OperationCanceledException ex) when (!cancellationToken.IsCancellationRequested)
        {
            throw new HubException(HubErrorKind.Timeout, $"the transfer of {file} stalled for more than {idleTimeout.TotalSeconds:0.#} s.", inner: ex);
        }
        catch (Exception ex) when (ex is IOException or HttpRequestException)
        {
            throw new HubException(HubErrorKind.Unreachable, $"the connection broke while fetching {file}: {ex.Message}", inner: ex);
        }
    }

    public void Dispose() => response.Dispose();
}
