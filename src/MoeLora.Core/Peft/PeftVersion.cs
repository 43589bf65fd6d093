using System.Globalization;

namespace MoeLora.Core.Peft;

/// <summary>
/// A PEFT release whose rules to reproduce. Behaviour that changed between releases is asked of this type by name
/// (e.g. <see cref="ConvertsMoeTargets"/>), never by comparing numbers at the call site.
/// </summary>
public readonly record struct PeftVersion(int Major, int Minor, int Patch) : IComparable<PeftVersion>
{
    public static readonly PeftVersion V0_17 = new(0, 17, 0);
    public static readonly PeftVersion V0_21 = new(0, 21, 0);

    /// <summary>The version the tool models unless told otherwise (checked against peft 0.21.0).</summary>
    public static PeftVersion Default => V0_21;

    public static PeftVersion Parse(string text)
    {
        var parts = text.Trim().TrimStart('v').Split('.');
        if (parts.Length is < 2 or > 3 || !parts.All(p => int.TryParse(p, NumberStyles.None, CultureInfo.InvariantCulture, out _)))
            throw new UserInputException($"'{text}' is not a PEFT version (expected e.g. 0.21 or 0.19.1)");
        var n = parts.Select(p => int.Parse(p, CultureInfo.InvariantCulture)).ToArray();
        var v = new PeftVersion(n[0], n[1], n.Length > 2 ? n[2] : 0);
        if (v < V0_17)
            throw new UserInputException($"PEFT {v} is older than 0.17, the first release with target_parameters; use 0.17 or newer");
        return v;
    }

    public int CompareTo(PeftVersion other) =>
        (Major, Minor, Patch).CompareTo((other.Major, other.Minor, other.Patch));

    public static bool operator <(PeftVersion a, PeftVersion b) => a.CompareTo(b) < 0;
    public static bool operator >(PeftVersion a, PeftVersion b) => a.CompareTo(b) > 0;
    public static bool operator <=(PeftVersion a, PeftVersion b) => a.CompareTo(b) <= 0;
    public static bool operator >=(PeftVersion a, PeftVersion b) => a.CompareTo(b) >= 0;

    /// <summary>#3083 (0.19): list targets on transformers-5 MoE models are rewritten onto fused experts.</summary>
    public bool ConvertsMoeTargets => this >= new PeftVersion(0, 19, 0);

    /// <summary>#3232 (0.20): regex and all-linear targets are resolved during that rewrite too.</summary>
    public bool ConvertsStringTargets => this >= new PeftVersion(0, 20, 0);

    /// <summary>#3318 (0.20): the default layer-index regex takes the first index (lazy) instead of the last.</summary>
    public bool LazyLayerIndex => this >= new PeftVersion(0, 20, 0);

    /// <summary>ensure_weight_tying for modules_to_save (0.18, #2803).</summary>
    public bool TiesModulesToSave => this >= new PeftVersion(0, 18, 0);

    /// <summary>ensure_weight_tying for target_modules (0.19, #2879).</summary>
    public bool TiesTargetModules => this >= new PeftVersion(0, 19, 0);

    /// <summary>Parameters on the root module raise (0.20, #3302).</summary>
    public bool RejectsRootParameters => this >= new PeftVersion(0, 20, 0);

    /// <summary>
    /// bias="all" trains only names ending in <c>.bias</c> (checked on 0.21: gpt-oss expert <c>*_proj_bias</c> stay frozen);
    /// earlier releases matched the substring "bias".
    /// </summary>
    public bool BiasAllMatchesSuffixOnly => this >= new PeftVersion(0, 21, 0);

    /// <summary>How a 3-D expert parameter (E, d1, d2) maps to (in, out).</summary>
    public ExpertOrientation Orientation => this switch
    {
        _ when this < new PeftVersion(0, 19, 0) => ExpertOrientation.NeverSwap,
        _ when this == new PeftVersion(0, 19, 0) => ExpertOrientation.SwapIfTransposed,
        _ => ExpertOrientation.SwapUnlessTransposed,
    };

    public override string ToString() => $"{Major}.{Minor}.{Patch}";
}

/// <summary>PEFT's in/out rule for 3-D parameters across releases (peft-semantics §2.3).</summary>
public enum ExpertOrientation
{
    /// <summary>0.17-0.18: in = d1, out = d2.</summary>
    NeverSwap,
    /// <summary>0.19.0 (bug): swapped only when the owner is_transposed.</summary>
    SwapIfTransposed,
    /// <summary>0.19.1 and later: swapped unless the owner is_transposed.</summary>
    SwapUnlessTransposed,
}
