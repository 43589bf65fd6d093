using MoeLora.Core;

namespace MoeLora.Sources;

/// <summary>
/// A failure to find or read a model that a user can act on. The message is one complete sentence meant to be
/// printed as is (no stack trace); callers catch this type and show <see cref="Exception.Message"/>.
/// </summary>
public class ModelSourceException : UserInputException
{
    public ModelSourceException(string message) : base(message) { }

    public ModelSourceException(string message, Exception inner) : base(message, inner) { }
}

/// <summary>A safetensors file or index that does not follow the format.</summary>
public sealed class SafetensorsFormatException : ModelSourceException
{
    public SafetensorsFormatException(string message) : base(message) { }

    public SafetensorsFormatException(string message, Exception inner) : base(message, inner) { }
}

/// <summary>What went wrong when talking to the Hub; lets callers react without parsing messages.</summary>
public enum HubErrorKind
{
    /// <summary>The repository is gated and the token is missing or has not been granted access.</summary>
    Gated,
    /// <summary>401 without a gate: private, missing, or the token was rejected.</summary>
    Unauthorized,
    /// <summary>403 that is not a gate: the token lacks a permission.</summary>
    Forbidden,
    RepoNotFound,
    RevisionNotFound,
    EntryNotFound,
    /// <summary>429 after every retry.</summary>
    RateLimited,
    /// <summary>5xx after every retry, or another unexpected status.</summary>
    Server,
    Timeout,
    /// <summary>The endpoint could not be reached at all (DNS, refused connection, TLS).</summary>
    Unreachable,
    /// <summary>The server answered, but not in a way the protocol allows (bad redirect, short body).</summary>
    Protocol,
}

/// <summary>A Hub request that failed; <see cref="Kind"/> says why.</summary>
public sealed class HubException : ModelSourceException
{
    public HubException(HubErrorKind kind, string message, int? statusCode = null, Exception? inner = null)
        : base(message, inner ?? new Exception(message))
    {
        Kind = kind;
        StatusCode = statusCode;
    }

    public HubErrorKind Kind { get; }

    /// <summary>The HTTP status of the last response, when there was one.</summary>
    public int? StatusCode { get; }

    /// <summary>The commit the Hub named in its error response (<c>X-Repo-Commit</c>), when it did.</summary>
    public string? Commit { get; init; }

    /// <summary>True when the Hub could not be used at all, so falling back to another source is reasonable.</summary>
    public bool IsConnectivityProblem => Kind is HubErrorKind.Unreachable or HubErrorKind.Timeout;
}
