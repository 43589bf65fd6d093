using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using MoeLora.Core;

namespace MoeLora.Sources.Adapters;

/// <summary>
/// One lora_A / lora_B pair of a saved adapter. <see cref="Parameter"/> is set for PEFT's ParamWrapper (a LoRA on an
/// <c>nn.Parameter</c> listed in <c>target_parameters</c>); <see cref="Experts"/> is then the number of experts E.
/// </summary>
public sealed record LoraPair(
    string Module, string? Parameter, int Depth, AdapterTensor A, AdapterTensor B, int Rank, double Alpha, int Experts,
    string Location, int? ExpertIndex, string? ExpertProjection)
{
    /// <summary>The name PEFT matches rank_pattern against: <c>module.param</c> for a ParamWrapper.</summary>
    public string PatternName => Parameter is null ? Module : Module + "." + Parameter;
    public double Scaling(bool rslora) => rslora ? Alpha / Math.Sqrt(Rank) : Alpha / Rank;
}

/// <summary>Reads the pairs of an adapter folder with PEFT's naming rules (peft-semantics §2.2).</summary>
public static partial class LoraPairs
{
    public const string Prefix = "base_model.model.";

    [GeneratedRegex(@"^(?<module>.+?)(?<nest>(\.base_layer)*)\.lora_(?<ab>[AB])\.weight$")]
    private static partial Regex KeyRegex();

    [GeneratedRegex(@"(^|\.)experts\.(?<e>\d+)\.(?<proj>[A-Za-z0-9_]+)$")]
    private static partial Regex PerExpertRegex();

    // Registration order of transformers v5's fused expert parameters: the first registered one is the innermost
    // ParamWrapper, so its keys carry the most ".base_layer" segments.
    private static readonly string[] RegistrationOrder = ["gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"];

    public static IReadOnlyList<string> TargetParameters(JsonObject config) => StringList(config, "target_parameters");

    public static IReadOnlyList<string> StringList(JsonObject config, string key)
    {
        var node = config[key];
        if (node is JsonArray arr) return arr.Where(n => n is not null).Select(n => n!.GetValue<string>()).ToList();
        if (node is JsonValue v && v.GetValueKind() == JsonValueKind.String) return [v.GetValue<string>()];
        return [];
    }

    /// <summary>All pairs plus the keys that are not LoRA factors (modules_to_save, embeddings, biases...).</summary>
    public static (IReadOnlyList<LoraPair> Pairs, IReadOnlyList<AdapterTensor> Other) Read(AdapterFolder folder)
    {
        var cfg = folder.Config;
        int r = Int(cfg, "r", 8);
        double alpha = Double(cfg, "lora_alpha", 8);
        var rankPattern = Patterns(cfg, "rank_pattern");
        var alphaPattern = Patterns(cfg, "alpha_pattern");
        var targetParams = TargetParameters(cfg);

        var halves = new Dictionary<(string Module, int Depth), (AdapterTensor? A, AdapterTensor? B)>();
        var other = new List<AdapterTensor>();
        foreach (var t in folder.Tensors)
        {
            string name = t.Name.StartsWith(Prefix, StringComparison.Ordinal) ? t.Name[Prefix.Length..] : t.Name;
            var m = KeyRegex().Match(name);
            if (!m.Success) { other.Add(t); continue; }
            var key = (m.Groups["module"].Value, m.Groups["nest"].Value.Length / ".base_layer".Length);
            halves.TryGetValue(key, out var h);
            halves[key] = m.Groups["ab"].Value == "A" ? (t, h.B) : (h.A, t);
        }

        var pairs = new List<LoraPair>();
        foreach (var ((module, depth), (a, b)) in halves.OrderBy(kv => kv.Key.Module, StringComparer.Ordinal).ThenBy(kv => kv.Key.Depth))
        {
            if (a is null || b is null)
                throw new UserInputException($"adapter key {module} has lora_{(a is null ? "B" : "A")} but no lora_{(a is null ? "A" : "B")}.");
            var owned = targetParams.Where(p => OwnerMatches(module, p)).Select(p => p[(p.LastIndexOf('.') + 1)..]).Distinct()
                .OrderBy(p => Array.IndexOf(RegistrationOrder, p) is var i && i < 0 ? int.MaxValue : i).ToList();
            string? parameter = null;
            if (owned.Count > 0 && a.Shape.Length == 2)
            {
                int index = owned.Count - 1 - depth;
                if (index < 0)
                    throw new UserInputException($"adapter key {module} is nested {depth} levels deep but target_parameters names only {owned.Count} parameter(s) of it.");
                parameter = owned[index];
            }
            string patternName = parameter is null ? module : module + "." + parameter;
            int rank = Match(rankPattern, patternName) is JsonNode rn ? ToInt(rn, "rank_pattern") : r;
            double al = Match(alphaPattern, patternName) is JsonNode an ? ToDouble(an, "alpha_pattern") : alpha;
            int experts = 1;
            if (parameter is not null)
            {
                if (a.Shape[0] % rank != 0)
                    throw new UserInputException($"adapter key {module} ({parameter}): lora_A has {a.Shape[0]} rows, not a multiple of its rank {rank}.");
                experts = (int)(a.Shape[0] / rank);
            }
            var pe = PerExpertRegex().Match(module);
            pairs.Add(new LoraPair(module, parameter, depth, a, b, rank, al, experts, Locate(module, parameter),
                pe.Success ? int.Parse(pe.Groups["e"].Value, System.Globalization.CultureInfo.InvariantCulture) : null,
                pe.Success ? pe.Groups["proj"].Value : null));
        }
        return (pairs, other);
    }

    private static bool OwnerMatches(string module, string targetParameter)
    {
        int dot = targetParameter.LastIndexOf('.');
        if (dot <= 0) return false;
        string owner = targetParameter[..dot];
        return module == owner || module.EndsWith("." + owner, StringComparison.Ordinal);
    }

    /// <summary>Where a module sits, from its name (the same location words as the report).</summary>
    public static string Locate(string module, string? parameter)
    {
        string n = module.ToLowerInvariant();
        if (n.Contains("vision") || n.Contains("visual")) return "vision";
        if (n.Contains("shared_expert")) return "shared";
        if (parameter is not null && n.EndsWith("experts", StringComparison.Ordinal)) return "routed";
        if (PerExpertRegex().IsMatch(module)) return "routed";
        string last = n[(n.LastIndexOf('.') + 1)..];
        if (last is "gate" or "router" || n.EndsWith(".router", StringComparison.Ordinal)) return "router";
        if (n.Contains("attn") || n.Contains("attention")) return "attention";
        if (n.Contains("mlp") || n.Contains("feed_forward")) return "mlp";
        return "other";
    }

    private static Dictionary<string, JsonNode> Patterns(JsonObject cfg, string key)
    {
        var d = new Dictionary<string, JsonNode>(StringComparer.Ordinal);
        if (cfg[key] is JsonObject o)
            foreach (var (k, v) in o) if (v is not null) d[k] = v;
        return d;
    }

    // PEFT's get_pattern_key: a key matches a name when the name ends with it after a dot (or equals it); keys are regexes.
    private static JsonNode? Match(Dictionary<string, JsonNode> patterns, string name)
    {
        foreach (var (k, v) in patterns)
        {
            bool hit;
            try { hit = Regex.IsMatch(name, "^(.*\\.)?(" + k + ")$"); }
            catch (ArgumentException) { throw new UserInputException($"rank_pattern/alpha_pattern key '{k}' is not a valid regex."); }
            if (hit) return v;
        }
        return null;
    }

    public static int Int(JsonObject cfg, string key, int fallback) =>
        cfg[key] is JsonNode n ? ToInt(n, key) : fallback;

    public static double Double(JsonObject cfg, string key, double fallback) =>
        cfg[key] is JsonNode n ? ToDouble(n, key) : fallback;

    // A number written by Python (8, 8.0) or created here (int or double) reads the same way.
    public static double ToDouble(JsonNode n, string key)
    {
        if (n is JsonValue v && v.GetValueKind() == JsonValueKind.Number &&
            double.TryParse(v.ToJsonString(), System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out double d))
            return d;
        throw new UserInputException($"adapter_config.json: {key} is {n.ToJsonString()}, not a number.");
    }

    public static int ToInt(JsonNode n, string key)
    {
        double d = ToDouble(n, key);
        if (d != Math.Floor(d) || d < 1 || d > int.MaxValue)
            throw new UserInputException($"adapter_config.json: {key} is {n.ToJsonString()}, not a positive integer.");
        return (int)d;
    }

    public static bool Bool(JsonObject cfg, string key) =>
        cfg[key] is JsonValue v && v.GetValueKind() == JsonValueKind.True;
}
