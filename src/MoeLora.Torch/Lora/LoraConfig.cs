using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace MoeLora.Torch.Lora;

/// <summary>
/// The LoRA fields of a PEFT <c>adapter_config.json</c> that change what is injected and how it computes.
/// Keeps the original JSON so a loaded adapter is saved back with exactly the config PEFT wrote.
/// The transformers-v5 MoE target rewrite (peft-semantics §5.3) is not applied here: configs saved by PEFT already
/// contain its result, and Core's AdapterPlan owns that rule for new configs.
/// </summary>
public sealed class LoraConfig
{
    public JsonObject Json { get; }
    public int R { get; init; } = 8;
    public double Alpha { get; init; } = 8;
    public double Dropout { get; init; }
    public bool UseRsLora { get; init; }
    public bool UseDora { get; init; }
    /// <summary>A list (exact-or-suffix match) or, when <see cref="TargetModulesRegex"/> is set, a regex (fullmatch).</summary>
    public IReadOnlyList<string> TargetModules { get; init; } = [];
    public string? TargetModulesRegex { get; init; }
    public IReadOnlyList<string> TargetParameters { get; init; } = [];
    public IReadOnlyList<string> ExcludeModules { get; init; } = [];
    public IReadOnlyList<int>? LayersToTransform { get; init; }
    public IReadOnlyList<KeyValuePair<string, int>> RankPattern { get; init; } = [];
    public IReadOnlyList<KeyValuePair<string, double>> AlphaPattern { get; init; } = [];
    /// <summary>"true" (A kaiming-uniform, B zero), "false" (both nn.Linear default init) or "gaussian".</summary>
    public string InitLoraWeights { get; init; } = "true";

    public LoraConfig(JsonObject json) => Json = json;

    public static LoraConfig Parse(string json)
    {
        var o = JsonNode.Parse(json)?.AsObject() ?? throw new InvalidDataException("adapter_config.json is empty.");
        var peftType = o["peft_type"]?.GetValue<string>() ?? "LORA";
        if (peftType != "LORA") throw new NotSupportedException($"peft_type {peftType} is not supported (LORA only).");
        foreach (var flag in new[] { "fan_in_fan_out", "use_qalora" })
            if (o[flag] is JsonValue v && v.GetValue<bool>()) throw new NotSupportedException($"adapter_config: {flag}=true is not supported.");
        if (o["lora_bias"] is JsonValue lb && lb.GetValue<bool>()) throw new NotSupportedException("adapter_config: lora_bias=true is not supported.");
        if (o["bias"]?.GetValue<string>() is { } b && b != "none") throw new NotSupportedException($"adapter_config: bias='{b}' is not supported.");
        if (o["modules_to_save"] is JsonArray { Count: > 0 }) throw new NotSupportedException("adapter_config: modules_to_save is not supported.");
        var tm = o["target_modules"];
        return new LoraConfig(o)
        {
            R = o["r"]?.GetValue<int>() ?? 8,
            Alpha = o["lora_alpha"]?.GetValue<double>() ?? 8,
            Dropout = o["lora_dropout"]?.GetValue<double>() ?? 0,
            UseRsLora = o["use_rslora"]?.GetValue<bool>() ?? false,
            UseDora = o["use_dora"]?.GetValue<bool>() ?? false,
            TargetModules = tm is JsonArray a ? Strings(a) : [],
            TargetModulesRegex = tm is JsonValue s ? s.GetValue<string>() : null,
            TargetParameters = o["target_parameters"] is JsonArray p ? Strings(p) : [],
            ExcludeModules = o["exclude_modules"] is JsonArray e ? Strings(e) : [],
            LayersToTransform = o["layers_to_transform"] switch
            {
                JsonArray l => l.Select(x => x!.GetValue<int>()).ToList(),
                JsonValue v => [v.GetValue<int>()],
                _ => null,
            },
            RankPattern = Pattern(o["rank_pattern"], n => n.GetValue<int>()),
            AlphaPattern = Pattern(o["alpha_pattern"], n => n.GetValue<double>()),
            InitLoraWeights = o["init_lora_weights"] switch
            {
                JsonValue v when v.TryGetValue<bool>(out var bb) => bb ? "true" : "false",
                JsonValue v => v.GetValue<string>(),
                _ => "true",
            },
        };
    }

    static List<string> Strings(JsonArray a) => a.Select(x => x!.GetValue<string>()).ToList();

    static List<KeyValuePair<string, T>> Pattern<T>(JsonNode? n, Func<JsonNode, T> get) =>
        n is JsonObject o ? o.Select(kv => new KeyValuePair<string, T>(kv.Key, get(kv.Value!))).ToList() : [];

    /// <summary>PEFT's get_pattern_key: first pattern (insertion order) with <c>re.match(rf"(.*\.)?({pat})$", key)</c>.</summary>
    static bool PatternMatches(string pattern, string key) => Regex.IsMatch(key, $"^(.*\\.)?({pattern})$");

    public int RankFor(string key) => RankPattern.FirstOrDefault(kv => PatternMatches(kv.Key, key)) is { Key: not null } m ? m.Value : R;
    public double AlphaFor(string key) => AlphaPattern.FirstOrDefault(kv => PatternMatches(kv.Key, key)) is { Key: not null } m ? m.Value : Alpha;

    public double Scaling(string key)
    {
        double r = RankFor(key), a = AlphaFor(key);
        return UseRsLora ? a / Math.Sqrt(r) : a / r;
    }

    /// <summary>PEFT's check_target_module_exists for list/regex targets (exclude_modules and layers_to_transform included).</summary>
    public bool MatchesModule(string key)
    {
        if (ExcludeModules.Any(x => key == x || key.EndsWith("." + x, StringComparison.Ordinal))) return false;
        if (TargetModulesRegex is not null) return Regex.IsMatch(key, $"^(?:{TargetModulesRegex})$");
        if (TargetModules.Contains(key)) return true;
        bool found = TargetModules.Any(t => key.EndsWith("." + t, StringComparison.Ordinal));
        if (found && LayersToTransform is { Count: > 0 } layers)
        {
            var m = Regex.Match(key, @"^.*?\.[^.]*\.(\d+)\."); // peft >= 0.20: first <name>.<digits>.
            found = m.Success && layers.Contains(int.Parse(m.Groups[1].Value));
        }
        return found;
    }

    /// <summary>target_parameters: exact or dot-suffix match on "module.param" (no exclusions or layer filter).</summary>
    public bool MatchesParameter(string key) =>
        TargetParameters.Any(t => key == t || key.EndsWith("." + t, StringComparison.Ordinal));
}
