using System.Net;

namespace MoeLora.Sources.Hub;

/// <summary>
/// Turns a failed Hub response into a message that says what to do, classified like huggingface_hub's
/// <c>hf_raise_for_status</c> (the <c>X-Error-Code</c> header decides; the status code is the fallback).
/// </summary>
internal static class HubErrors
{
    public static HubException FromResponse(HttpResponseMessage response, HubFile file, string endpoint, bool sentToken, int attempts)
    {
        HubException error = Classify(response, file, endpoint, sentToken, attempts);
        return error.Commit is null && Header(response, "X-Repo-Commit") is { } commit
            ? new HubException(error.Kind, error.Message, error.StatusCode) { Commit = commit }
            : error;
    }

    private static HubException Classify(HttpResponseMessage response, HubFile file, string endpoint, bool sentToken, int attempts)
    {
        int status = (int)response.StatusCode;
        string? code = Header(response, "X-Error-Code");
        string? serverMessage = Header(response, "X-Error-Message");
        string repo = file.Repo.Value;
        string page = $"{endpoint}/{repo}";

        if (code == "GatedRepo")
        {
            return new HubException(HubErrorKind.Gated, sentToken
                ? $"{repo} is a gated model and your token has not been granted access (HTTP {status}): accept the licence at {page} with the account the token belongs to, then retry."
                : $"{repo} is a gated model (HTTP {status}): accept the licence at {page}, then set HF_TOKEN to a read token of that account (or put it in $HF_HOME/token).", status);
        }
        if (serverMessage is not null && serverMessage.Contains("Access to this resource is disabled", StringComparison.OrdinalIgnoreCase))
            return new HubException(HubErrorKind.Forbidden, $"access to {repo} has been disabled on {endpoint} (HTTP {status}).", status);

        switch (status)
        {
            case 401 when serverMessage is not null && serverMessage.Contains("Invalid credentials", StringComparison.OrdinalIgnoreCase):
                return new HubException(HubErrorKind.Unauthorized, $"{endpoint} rejected the token (invalid credentials, HTTP 401): check or renew HF_TOKEN.", status);
            case 401:
                // The Hub answers 401 for private, gated and missing repositories alike when no token is sent.
                return new HubException(HubErrorKind.Unauthorized, sentToken
                    ? $"model {repo} (revision {file.Revision}) was not found on {endpoint}, or your token cannot read it (HTTP 401)."
                    : $"model {repo} (revision {file.Revision}) was not found on {endpoint}, or it is private or gated (HTTP 401): if you have access, set HF_TOKEN.", status);
            case 403:
                return new HubException(HubErrorKind.Forbidden, $"{endpoint} refused access to {file} (HTTP 403): make sure your token has read permission for {repo}.", status);
            case 404 when code == "RepoNotFound":
                return new HubException(HubErrorKind.RepoNotFound, $"model {repo} was not found on {endpoint} (revision {file.Revision}, HTTP 404): check the id.", status);
            case 404 when code == "RevisionNotFound":
                return new HubException(HubErrorKind.RevisionNotFound, $"revision {file.Revision} was not found in model {repo} on {endpoint} (HTTP 404).", status);
            case 404 when code == "EntryNotFound":
                return new HubException(HubErrorKind.EntryNotFound, $"{file.Path} was not found in model {repo} at revision {file.Revision} (HTTP 404).", status);
            case 404:
                return new HubException(HubErrorKind.EntryNotFound, $"{file.Path} of model {repo} at revision {file.Revision} was not found on {endpoint} (HTTP 404: the model, the revision or the file does not exist).", status);
            case 429:
                return new HubException(HubErrorKind.RateLimited, $"{endpoint} is rate-limiting requests (HTTP 429, {attempts} attempts) for {file}: wait a few minutes, or set HF_TOKEN for higher limits.", status);
            case >= 500:
                return new HubException(HubErrorKind.Server, $"{endpoint} failed with HTTP {status} ({response.ReasonPhrase}) for {file} after {attempts} attempts: try again later.", status);
            default:
                return new HubException(HubErrorKind.Protocol, $"{endpoint} answered HTTP {status} ({response.ReasonPhrase}) for {file}.", status);
        }
    }

    public static bool IsRetryable(HttpStatusCode status) => (int)status == 429 || (int)status >= 500;

    private static string? Header(HttpResponseMessage response, string name) =>
        response.Headers.TryGetValues(name, out IEnumerable<string>? values) ? values.FirstOrDefault() : null;
}
