using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using MoeLora.Core.Util;

namespace MoeLora.Core.Peft;

/// <summary>
/// PEFT's <c>target_modules</c> / <c>exclude_modules</c>: either a regex string (full match) or a list of names
/// matched exactly or as dot-suffixes. <c>"all-linear"</c> is a string, <c>["all-linear"]</c> is a list.
/// </summary>
public sealed record ModuleSelector
{
    private ModuleSelector(string? pattern, IReadOnlyList<string>? names)
    {
        Pattern = pattern;
        Names = names;
    }

    /// <summary>The regex, when PEFT received a str.</summary>
    public string? Pattern { get; }

    /// <summary>The names, when PEFT received a list (kept in first-seen order, duplicates dropped like a set).</summary>
    public IReadOnlyList<string>? Names { get; }

    public bool IsPattern => Pattern is not null;

    public bool IsAllLinear => Pattern is not null && Pattern.Equals("all-linear", StringComparison.OrdinalIgnoreCase);

    public static ModuleSelector Regex(string pattern) => new(pattern, null);

    public static ModuleSelector List(IEnumerable<string> names) => new(null, names.Distinct(StringComparer.Ordinal).ToList());

    public JsonNode ToJson() => Pattern is not null ? JsonValue.Create(Pattern) : new JsonArray(Names!.Order(StringComparer.Ordinal).Select(n => (JsonNode)JsonValue.Create(n)).ToArray());

    public override string ToString() => Pattern is not null ? $"\"{Pattern}\"" : "[" + string.Join(", ", Names!) + "]";
}

/// <summary>How PEFT receives a LoRA configuration, which decides what happens to keys it does not know.</summary>
public enum LoraConfigSource
{
    /// <summary><c>LoraConfig(**kwargs)</c>: an unknown key is a TypeError.</summary>
    Kwargs,

    /// <summary><c>LoraConfig.from_pretrained</c> / <c>from_peft_type</c> on an adapter_config.json: unknown keys are dropped with a warning.</summary>
    AdapterConfig,
}

/// <summary>
/// A LoRA configuration with PEFT's field names and defaults (<c>LoraConfig</c>). Parsed from a PEFT
/// <c>adapter_config.json</c> or a JSON object of LoraConfig keyword arguments, and written back in PEFT's format.
/// </summary>
public sealed record LoraConfig
{
    public int R { get; init; } = 8;

    public double LoraAlpha { get; init; } = 8;

    public ModuleSelector? TargetModules { get; init; }

    public IReadOnlyList<string>? TargetParameters { get; init; }

    public ModuleSelector? ExcludeModules { get; init; }

    /// <summary><c>layers_to_transform</c>: null, one int (equality) or a list (membership).</summary>
    public IReadOnlyList<int>? LayersToTransform { get; init; }

    /// <summary>True when <c>layers_to_transform</c> was a single int rather than a list.</summary>
    public bool LayersToTransformIsInt { get; init; }

    /// <summary><c>layers_pattern</c>: null, a str or a list (each entry inserted into the regex unescaped).</summary>
    public IReadOnlyList<string>? LayersPattern { get; init; }

    /// <summary>Ordered: PEFT takes the first pattern that matches.</summary>
    public IReadOnlyList<KeyValuePair<string, int>> RankPattern { get; init; } = [];

    public IReadOnlyList<KeyValuePair<string, double>> AlphaPattern { get; init; } = [];

    public IReadOnlyList<string>? ModulesToSave { get; init; }

    /// <summary><c>none</c>, <c>all</c> or <c>lora_only</c>.</summary>
    public string Bias { get; init; } = "none";

    public bool UseDora { get; init; }

    public bool UseRslora { get; init; }

    public bool LoraBias { get; init; }

    public bool FanInFanOut { get; init; }

    public double LoraDropout { get; init; }

    public bool EnsureWeightTying { get; init; }

    public string? TaskType { get; init; } = "CAUSAL_LM";

    /// <summary><c>init_lora_weights</c> as written (true, false, or a method name such as "gaussian").</summary>
    public JsonNode? InitLoraWeights { get; init; } = JsonValue.Create(true);

    /// <summary>
    /// <c>trainable_token_indices</c>: one entry per embedding layer to train selectively; a null key is PEFT's list form
    /// (the model's input embedding). Null when not given.
    /// </summary>
    public IReadOnlyList<KeyValuePair<string?, IReadOnlyList<int>>>? TrainableTokenIndices { get; init; }

    /// <summary>Keys of an adapter_config.json that PEFT 0.21 does not know and drops with a warning (forward compatibility).</summary>
    public IReadOnlyList<string> IgnoredKeys { get; init; } = [];

    /// <summary>The warnings PEFT prints while building this config (dropped keys, ignored sub-configs).</summary>
    public IReadOnlyList<string> LoadWarnings { get; init; } = [];

    /// <summary>The seed report's target list.</summary>
    public static IReadOnlyList<string> SeedTargets { get; } = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    /// <summary>The seed report's configuration: r=16, alpha=32 on q,k,v,o,gate,up,down_proj.</summary>
    public static LoraConfig SeedDefault { get; } = new()
    {
        R = 16,
        LoraAlpha = 32,
        TargetModules = ModuleSelector.List(SeedTargets),
    };

    /// <summary>PEFT 0.21's TaskType values (peft/utils/peft_types.py), in its order, for PeftConfigMixin's check.</summary>
    public static IReadOnlyList<string> TaskTypes { get; } = ["SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"];

    /// <summary>
    /// Parses a PEFT adapter_config.json, or a JSON object of LoraConfig keyword arguments. Without
    /// <paramref name="kind"/>, an object holding <c>peft_type</c> is read as an adapter_config.json (every file
    /// save_pretrained writes has it, and PEFT's own loader dispatches on it), anything else as keyword arguments.
    /// </summary>
    public static LoraConfig FromJson(string json, string source, LoraConfigSource? kind = null)
    {
        JsonObject obj;
        try
        {
            obj = JsonNode.Parse(json) as JsonObject ?? throw new PeftConfigException($"{source} must hold a JSON object");
        }
        catch (JsonException e)
        {
            throw new PeftConfigException($"{source} is not valid JSON: {Util.UserJson.Describe(e)}");
        }
        return FromJson(obj, source, kind);
    }

    public static LoraConfig FromJson(JsonObject o, string source, LoraConfigSource? kind = null)
    {
        var mode = kind ?? (o.ContainsKey("peft_type") ? LoraConfigSource.AdapterConfig : LoraConfigSource.Kwargs);
        var loadWarnings = new List<string>();
        var ignored = new List<string>();
        var unknown = o.Select(kv => kv.Key).Where(k => LoraConfigFields.Find(k) is null).ToList();
        if (mode == LoraConfigSource.Kwargs && unknown.Count > 0)
        {
            // Python reports the first unexpected keyword in the order given.
            var error = new PeftInjectionException("TypeError", $"TypeError: LoraConfig.__init__() got an unexpected keyword argument '{unknown[0]}'");
            throw LoraConfigFields.Suggest(unknown[0]) is { } near ? error.WithHint($"did you mean '{near}'") : error;
        }
        if (mode == LoraConfigSource.AdapterConfig)
        {
            // PeftConfigMixin.from_json_file drops runtime_config; from_peft_type then drops keys this PEFT version
            // does not know, with a warning (forward compatibility), unless peft_type is missing as well.
            if (o.ContainsKey("runtime_config"))
                loadWarnings.Add("The configuration file contains a `runtime_config` key. This is ignored. Runtime configurations are only valid at runtime.");
            if (unknown.Count > 0)
            {
                if (!o.ContainsKey("peft_type"))
                    throw new PeftInjectionException("TypeError", "TypeError: The LoraConfig config that is trying to be loaded is missing required keys: {'peft_type'}.");
                loadWarnings.Add($"Unexpected keyword arguments [{string.Join(", ", unknown.Order(StringComparer.Ordinal).Select(k => $"'{k}'"))}] for class LoraConfig, these are ignored. " +
                    "This probably means that you're loading a configuration file that was saved using a higher version of the library and additional parameters have been introduced since. " +
                    "It is highly recommended to upgrade the PEFT version before continuing (e.g. by running `pip install -U peft`).");
                ignored.AddRange(unknown);
            }
            var peftType = Str(o, "peft_type", source);
            if (peftType is not null && !peftType.Equals("LORA", StringComparison.OrdinalIgnoreCase))
                throw new PeftConfigException($"{source}: peft_type is '{peftType}'; only LORA adapters are analysed");
        }

        // __post_init__, in PEFT's order: sub-configs must be None, a dict or the dataclass.
        foreach (var (key, cls) in SubConfigs)
            if (o[key] is not null and not JsonObject)
                throw new PeftInjectionException("TypeError", $"TypeError: `{cls}` must be a `{cls}`, a dict, or None.");

        var config = new LoraConfig
        {
            R = (int)(Int(o, "r", source) ?? 8),
            LoraAlpha = Num(o, "lora_alpha", source) ?? 8,
            TargetModules = Selector(o, "target_modules", source),
            TargetParameters = TargetParams(o, source),
            ExcludeModules = Selector(o, "exclude_modules", source),
            LayersToTransform = Layers(o, source, out var isInt),
            LayersToTransformIsInt = isInt,
            LayersPattern = StrOrList(o, "layers_pattern", source),
            RankPattern = Pattern(o, "rank_pattern", source).Select(kv => new KeyValuePair<string, int>(kv.Key, checked((int)kv.Value))).ToList(),
            AlphaPattern = Pattern(o, "alpha_pattern", source),
            ModulesToSave = StrOrList(o, "modules_to_save", source),
            Bias = Str(o, "bias", source) ?? "none",
            UseDora = Bool(o, "use_dora", source),
            UseRslora = Bool(o, "use_rslora", source),
            LoraBias = Bool(o, "lora_bias", source),
            FanInFanOut = Bool(o, "fan_in_fan_out", source),
            LoraDropout = Num(o, "lora_dropout", source) ?? 0,
            EnsureWeightTying = Bool(o, "ensure_weight_tying", source),
            TaskType = o.ContainsKey("task_type") ? Str(o, "task_type", source) : "CAUSAL_LM",
            InitLoraWeights = o.TryGetPropertyValue("init_lora_weights", out var init) ? init?.DeepClone() : JsonValue.Create(true),
            TrainableTokenIndices = TokenIndices(o, source),
            IgnoredKeys = ignored,
        };
        if (Bool(o, "use_dora", source) && PyJson.Truthy(o["megatron_config"]))
            throw new PeftInjectionException("ValueError", "DoRA does not support megatron_core, please set `use_dora=False`.");
        if (IsInit(config, "loftq") && !PyJson.Truthy(o["loftq_config"]))
            throw new PeftInjectionException("ValueError", "`loftq_config` must be specified when `init_lora_weights` is 'loftq'.");
        if (PyJson.Truthy(o["loftq_config"]) && !IsInit(config, "loftq"))
            loadWarnings.Add("`loftq_config` specified but will be ignored when `init_lora_weights` is not 'loftq'.");
        else if (o["eva_config"] is not null && !IsInit(config, "eva"))
            loadWarnings.Add("`eva_config` specified but will be ignored when `init_lora_weights` is not 'eva'.");
        else if (o["corda_config"] is not null && !IsInit(config, "corda"))
            loadWarnings.Add("`corda_config` specified but will be ignored when `init_lora_weights` is not 'corda'.");
        config = config with { LoadWarnings = loadWarnings };
        config.Validate();

        // What MoeLora cannot plan yet is refused by name, never dropped (LoraConfigFields is the one table).
        foreach (var field in LoraConfigFields.All.Where(f => f.Role == LoraFieldRole.Refused))
            if (o.TryGetPropertyValue(field.Name, out var v) && field.IsActive(v))
                throw new PeftConfigException($"{source}: {field.Name}={PyJson.Repr(v)} is not supported: {field.Why}; MoeLora cannot plan it yet");
        if (mode == LoraConfigSource.Kwargs && Bool(o, "inference_mode", source))
            throw new PeftConfigException($"{source}: inference_mode=True is not supported: get_peft_model freezes every adapter (trainable params: 0); MoeLora plans adapters for training");
        return config;
    }

    private static bool IsInit(LoraConfig c, string name) => c.InitLoraWeights is JsonValue v && v.TryGetValue<string>(out var s) && s == name;

    /// <summary>Sub-config fields <c>_get_lora_subconfig</c> converts, and their dataclasses.</summary>
    private static readonly (string Key, string Class)[] SubConfigs =
    [
        ("velora_config", "VeloraConfig"), ("kasa_config", "KasaConfig"), ("eva_config", "EvaConfig"), ("corda_config", "CordaConfig"),
        ("lora_ga_config", "LoraGAConfig"), ("arrow_config", "ArrowConfig"), ("use_bdlora", "BdLoraConfig"),
    ];

    /// <summary>The checks of <c>LoraConfig.__post_init__</c> (and of update_layer that need no model).</summary>
    public void Validate()
    {
        if (TaskType is not null && !TaskTypes.Contains(TaskType))
            throw new PeftInjectionException("ValueError", $"Invalid task type: '{TaskType}'. Must be one of the following task types: {string.Join(", ", TaskTypes)}.");
        var initKind = LoraInit.Classify(InitLoraWeights);
        if (R <= 0) throw new PeftConfigException($"`r` should be a positive integer value but the value passed is {R}");
        if (Bias is not ("none" or "all" or "lora_only")) throw new PeftConfigException($"Requested bias: {Bias}, is not implemented.");
        if (TargetModules?.Pattern is { } p && !TargetModules.IsAllLinear) PyRegex.Validate(p, "target_modules");
        if (ExcludeModules?.Pattern is { } e) PyRegex.Validate(e, "exclude_modules");
        if (TargetModules?.IsPattern == true && LayersToTransform is not null)
            throw new PeftConfigException("`layers_to_transform` cannot be used when `target_modules` is a str.");
        if (TargetModules?.IsPattern == true && LayersPattern is { Count: > 0 })
            throw new PeftConfigException("`layers_pattern` cannot be used when `target_modules` is a str.");
        // PEFT tests truthiness: layers_to_transform=0 or [] counts as "not given" (fixed only after 0.21).
        var layersGiven = LayersToTransform is { Count: > 0 } && !(LayersToTransformIsInt && LayersToTransform[0] == 0);
        if (LayersPattern is { Count: > 0 } && !layersGiven)
            throw new PeftConfigException("When `layers_pattern` is specified, `layers_to_transform` must also be specified. ");
        if (LoraBias && initKind is not (LoraInitKind.Default or LoraInitKind.None))
            throw new PeftInjectionException("ValueError", $"The argument lora_bias=True is only supported with init_lora_weights=True or False, got init_lora_weights={InitLoraWeights!.GetValue<string>()} instead.");
        if (UseDora && LoraBias) throw new PeftInjectionException("ValueError", "The argument lora_bias=True is not supported for DoRA, please pass use_dora=False");
        foreach (var kv in RankPattern) PyRegex.Validate(kv.Key, "rank_pattern key");
        foreach (var kv in AlphaPattern) PyRegex.Validate(kv.Key, "alpha_pattern key");
        if (RankPattern.Any(kv => kv.Value <= 0)) throw new PeftConfigException("rank_pattern values must be positive integers");
        if (LoraInit.RefusalReason(InitLoraWeights) is { } refusal) throw new PeftConfigException(refusal);
        if (TrainableTokenIndices is { } tokens && ModulesToSave is { } mts)
        {
            // PEFT compares the layer name (a dict key, or the input embedding's full name) with the list entries.
            foreach (var layer in tokens.Select(t => t.Key).OfType<string>().Where(mts.Contains))
                throw new PeftInjectionException("ValueError",
                    $"The embedding layer is already marked to be trained fully, either specify `modules_to_save=[..., \"{layer}\", ...]` or `trainable_tokens={{'{layer}': x}}` but not both.");
        }
    }

    /// <summary>The adapter_config.json PEFT writes for this configuration (keys in PEFT's names).</summary>
    /// <param name="inferenceMode">
    /// PEFT's <c>save_pretrained</c> writes true (a saved adapter loads frozen); a config meant to start training, as
    /// <c>moelora plan</c> writes, must say false or <c>get_peft_model</c> freezes the new adapters.
    /// </param>
    public JsonObject ToAdapterConfigJson(string? baseModel, bool inferenceMode = true)
    {
        var o = new JsonObject
        {
            ["alpha_pattern"] = new JsonObject(AlphaPattern.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)JsonValue.Create(kv.Value)))),
            ["base_model_name_or_path"] = baseModel,
            ["bias"] = Bias,
            ["ensure_weight_tying"] = EnsureWeightTying,
            ["exclude_modules"] = ExcludeModules?.ToJson(),
            ["fan_in_fan_out"] = FanInFanOut,
            ["inference_mode"] = inferenceMode,
            ["init_lora_weights"] = InitLoraWeights?.DeepClone(),
            ["layers_pattern"] = LayersPattern is null ? null : LayersPattern.Count == 1 ? LayersPattern[0] : new JsonArray(LayersPattern.Select(x => (JsonNode)JsonValue.Create(x)).ToArray()),
            ["layers_to_transform"] = LayersToTransform is null ? null : LayersToTransformIsInt ? LayersToTransform[0] : new JsonArray(LayersToTransform.Select(x => (JsonNode)JsonValue.Create(x)).ToArray()),
            ["lora_alpha"] = LoraAlpha % 1 == 0 ? JsonValue.Create((long)LoraAlpha) : JsonValue.Create(LoraAlpha),
            ["lora_bias"] = LoraBias,
            ["lora_dropout"] = PyFloat(LoraDropout),
            ["modules_to_save"] = ModulesToSave is null ? null : new JsonArray(ModulesToSave.Select(x => (JsonNode)JsonValue.Create(x)).ToArray()),
            ["peft_type"] = "LORA",
            ["r"] = R,
            ["rank_pattern"] = new JsonObject(RankPattern.Select(kv => KeyValuePair.Create(kv.Key, (JsonNode?)JsonValue.Create(kv.Value)))),
            ["revision"] = null,
            ["target_modules"] = TargetModules?.ToJson(),
            ["target_parameters"] = TargetParameters is null ? null : new JsonArray(TargetParameters.Select(x => (JsonNode)JsonValue.Create(x)).ToArray()),
            ["task_type"] = TaskType,
            ["use_dora"] = UseDora,
            ["use_rslora"] = UseRslora,
        };
        if (TrainableTokenIndices is not null) o["trainable_token_indices"] = TokenIndicesJson();
        return o;
    }

    /// <summary>A Python float as json.dumps writes it (0.0, not 0), so files compare equal to PEFT's.</summary>
    private static JsonNode PyFloat(double value)
    {
        var text = value.ToString("R", CultureInfo.InvariantCulture);
        if (!text.Contains('.', StringComparison.Ordinal) && !text.Contains('E', StringComparison.Ordinal)) text += ".0";
        return JsonNode.Parse(text)!;
    }

    /// <summary>LoraConfig keyword arguments as a user would pass them (only non-default fields).</summary>
    public JsonObject ToKwargsJson()
    {
        var full = ToAdapterConfigJson(null);
        var o = new JsonObject { ["r"] = R, ["lora_alpha"] = full["lora_alpha"]!.DeepClone() };
        if (TargetModules is not null) o["target_modules"] = TargetModules.ToJson();
        if (TargetParameters is not null) o["target_parameters"] = full["target_parameters"]!.DeepClone();
        foreach (var key in new[] { "exclude_modules", "layers_to_transform", "layers_pattern", "modules_to_save" })
            if (full[key] is not null) o[key] = full[key]!.DeepClone();
        if (RankPattern.Count > 0) o["rank_pattern"] = full["rank_pattern"]!.DeepClone();
        if (AlphaPattern.Count > 0) o["alpha_pattern"] = full["alpha_pattern"]!.DeepClone();
        if (Bias != "none") o["bias"] = Bias;
        if (UseDora) o["use_dora"] = true;
        if (UseRslora) o["use_rslora"] = true;
        if (LoraBias) o["lora_bias"] = true;
        if (LoraDropout != 0) o["lora_dropout"] = LoraDropout;
        if (EnsureWeightTying) o["ensure_weight_tying"] = true;
        if (InitLoraWeights is not JsonValue iv || !iv.TryGetValue<bool>(out var init) || !init) o["init_lora_weights"] = InitLoraWeights?.DeepClone();
        if (TrainableTokenIndices is not null) o["trainable_token_indices"] = TokenIndicesJson();
        o["task_type"] = TaskType;
        return o;
    }

    private static bool IsEmpty(JsonNode n) => n is JsonArray { Count: 0 } || n is JsonObject { Count: 0 } || (n is JsonValue v && v.TryGetValue<bool>(out var b) && !b);

    private static string Where(string source, string key) => $"{source}: '{key}'";

    private static string? Str(JsonObject o, string key, string source)
    {
        if (!o.TryGetPropertyValue(key, out var v) || v is null) return null;
        return v is JsonValue jv && jv.TryGetValue<string>(out var s) ? s : throw new PeftConfigException($"{Where(source, key)} must be a string");
    }

    private static bool Bool(JsonObject o, string key, string source)
    {
        if (!o.TryGetPropertyValue(key, out var v) || v is null) return false;
        return v is JsonValue jv && jv.TryGetValue<bool>(out var b) ? b : throw new PeftConfigException($"{Where(source, key)} must be true or false");
    }

    private static long? Int(JsonObject o, string key, string source)
    {
        if (!o.TryGetPropertyValue(key, out var v) || v is null) return null;
        if (JsonNumbers.TryLong(v, out var l)) return l;
        throw new PeftConfigException($"{Where(source, key)} must be an integer");
    }

    private static double? Num(JsonObject o, string key, string source)
    {
        if (!o.TryGetPropertyValue(key, out var v) || v is null) return null;
        return JsonNumbers.TryDouble(v, out var d) ? d : throw new PeftConfigException($"{Where(source, key)} must be a number");
    }

    private static ModuleSelector? Selector(JsonObject o, string key, string source)
    {
        if (!o.TryGetPropertyValue(key, out var v) || v is null) return null;
        if (v is JsonValue jv && jv.TryGetValue<string>(out var s)) return ModuleSelector.Regex(s);
        if (v is JsonArray arr)
            return ModuleSelector.List(arr.Select(x => x is JsonValue xv && xv.TryGetValue<string>(out var n) ? n : throw new PeftConfigException($"{Where(source, key)} must be a string or a list of strings")));
        throw new PeftConfigException($"{Where(source, key)} must be a string or a list of strings");
    }

    private static IReadOnlyList<string>? TargetParams(JsonObject o, string source)
    {
        if (!o.TryGetPropertyValue("target_parameters", out var v) || v is null) return null;
        if (v is JsonValue jv && jv.TryGetValue<string>(out _))
            throw new PeftInjectionException("TypeError", "TypeError: `target_parameters` must be a list of strings or None.");
        return StrOrList(o, "target_parameters", source);
    }

    private static IReadOnlyList<string>? StrOrList(JsonObject o, string key, string source)
    {
        if (!o.TryGetPropertyValue(key, out var v) || v is null) return null;
        if (v is JsonValue jv && jv.TryGetValue<string>(out var s)) return [s];
        if (v is JsonArray arr)
            return arr.Select(x => x is JsonValue xv && xv.TryGetValue<string>(out var n) ? n : throw new PeftConfigException($"{Where(source, key)} must hold strings")).ToList();
        throw new PeftConfigException($"{Where(source, key)} must be a string or a list of strings");
    }

    private JsonNode? TokenIndicesJson()
    {
        if (TrainableTokenIndices is null) return null;
        JsonArray Ints(IReadOnlyList<int> xs) => new(xs.Select(x => (JsonNode)JsonValue.Create(x)).ToArray());
        if (TrainableTokenIndices is [{ Key: null } only]) return Ints(only.Value);
        return new JsonObject(TrainableTokenIndices.Select(kv => KeyValuePair.Create(kv.Key!, (JsonNode?)Ints(kv.Value))));
    }

    /// <summary><c>trainable_token_indices</c>: a list of ints (the input embedding) or an object of layer name to ints.</summary>
    private static IReadOnlyList<KeyValuePair<string?, IReadOnlyList<int>>>? TokenIndices(JsonObject o, string source)
    {
        const string key = "trainable_token_indices";
        if (!o.TryGetPropertyValue(key, out var v) || v is null) return null;
        IReadOnlyList<int> Ints(JsonNode? n, string where) => n is JsonArray arr
            ? arr.Select(x => JsonNumbers.TryLong(x, out var i) ? checked((int)i) : throw new PeftConfigException($"{where} must hold integers")).ToList()
            : throw new PeftConfigException($"{where} must be a list of integers");
        if (v is JsonArray) return [new(null, Ints(v, Where(source, key)))];
        if (v is JsonObject map) return map.Select(kv => new KeyValuePair<string?, IReadOnlyList<int>>(kv.Key, Ints(kv.Value, $"{Where(source, key)}['{kv.Key}']"))).ToList();
        throw new PeftConfigException($"{Where(source, key)} must be a list of token indices or an object of layer name -> token indices");
    }

    private static IReadOnlyList<int>? Layers(JsonObject o, string source, out bool isInt)
    {
        isInt = false;
        if (!o.TryGetPropertyValue("layers_to_transform", out var v) || v is null) return null;
        if (v is JsonValue && JsonNumbers.TryLong(v, out var l))
        {
            isInt = true;
            return [checked((int)l)];
        }
        if (v is JsonArray arr)
            return arr.Select(x => JsonNumbers.TryLong(x, out var n) ? checked((int)n) : throw new PeftConfigException($"{Where(source, "layers_to_transform")} must hold integers")).ToList();
        throw new PeftConfigException($"{Where(source, "layers_to_transform")} must be an integer or a list of integers");
    }

    private static IReadOnlyList<KeyValuePair<string, double>> Pattern(JsonObject o, string key, string source)
    {
        if (!o.TryGetPropertyValue(key, out var v) || v is null) return [];
        if (v is not JsonObject map) throw new PeftConfigException($"{Where(source, key)} must be an object of pattern -> value");
        return map.Select(kv => JsonNumbers.TryDouble(kv.Value, out var d)
            ? new KeyValuePair<string, double>(kv.Key, d)
            : throw new PeftConfigException($"{Where(source, key)}['{kv.Key}'] must be a number")).ToList();
    }

    public string Describe() =>
        FormattableString.Invariant($"r={R}, lora_alpha={LoraAlpha}, target_modules={TargetModules?.ToString() ?? "None"}") +
        (TargetParameters is null ? "" : $", target_parameters=[{string.Join(", ", TargetParameters)}]");
}
