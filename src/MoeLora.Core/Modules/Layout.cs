namespace MoeLora.Core.Modules;

/// <summary>Which transformers module layout to reproduce.</summary>
public enum Layout
{
    /// <summary>transformers 4.57: per-expert <c>nn.Linear</c> modules where 4.57 had them.</summary>
    V4,

    /// <summary>transformers 5.x (checked against 5.17): fused 3-D expert parameters.</summary>
    V5,
}

public static class LayoutNames
{
    public static string Name(this Layout layout) => layout == Layout.V4 ? "v4" : "v5";

    public static Layout Parse(string text) => text.Trim().ToLowerInvariant() switch
    {
        "v4" or "4" or "4.57" => Layout.V4,
        "v5" or "5" or "5.17" => Layout.V5,
        _ => throw new UserInputException($"unknown layout '{text}': use v4 (transformers 4.57) or v5 (transformers 5.x)"),
    };
}
