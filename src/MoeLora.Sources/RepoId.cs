using System.Text.RegularExpressions;

namespace MoeLora.Sources;

/// <summary>A Hub model id such as <c>org/name</c> (or a bare <c>name</c>), validated like huggingface_hub does.</summary>
public sealed partial record RepoId
{
    private RepoId(string value) => Value = value;

    public string Value { get; }

    /// <summary>The folder huggingface_hub uses for this model in the hub cache: <c>models--org--name</c>.</summary>
    public string CacheFolderName => "models--" + Value.Replace("/", "--", StringComparison.Ordinal);

    public override string ToString() => Value;

    /// <summary>Accepts <c>name</c> or <c>org/name</c>: letters, digits, <c>-</c>, <c>_</c>, <c>.</c>, up to 96 each.</summary>
    public static bool TryParse(string text, out RepoId id)
    {
        id = null!;
        if (!Shape().IsMatch(text)) return false;
        // Same exclusions as huggingface_hub's validate_repo_id: these would collide with the cache folder naming.
        if (text.Contains("--", StringComparison.Ordinal) || text.Contains("..", StringComparison.Ordinal)) return false;
        if (text.EndsWith(".git", StringComparison.Ordinal)) return false;
        foreach (string part in text.Split('/'))
            if (part.StartsWith('.') || part.StartsWith('-') || part.EndsWith('.') || part.EndsWith('-')) return false;
        id = new RepoId(text);
        return true;
    }

    [GeneratedRegex(@"^([A-Za-z0-9_.\-]{1,96}/)?[A-Za-z0-9_.\-]{1,96}$")]
    private static partial Regex Shape();
}
