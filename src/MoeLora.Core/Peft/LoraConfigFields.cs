using System.Text.Json.Nodes;
using MoeLora.Core.Util;

namespace MoeLora.Core.Peft;

/// <summary>What MoeLora does with one keyword of PEFT 0.21's <c>LoraConfig.__init__</c>.</summary>
public enum LoraFieldRole
{
    /// <summary>Read and reproduced by the planner (it changes what is adapted, trained or saved).</summary>
    Planned,

    /// <summary>Accepted: PEFT reads it, but it changes no count, shape or saved key (the reason says why).</summary>
    NoEffect,

    /// <summary>Refused with a one-line error whenever it is active: it changes what PEFT builds in a way MoeLora cannot plan yet.</summary>
    Refused,
}

/// <summary>When a <see cref="LoraFieldRole.Refused"/> field counts as set.</summary>
public enum FieldActivity
{
    /// <summary>Python truthiness (None, False, 0, "", [], {} are off), as PEFT tests it (<c>if config.layer_replication:</c>).</summary>
    Truthy,

    /// <summary>Any value but None: PEFT turns a dict into a sub-config dataclass, and a dataclass instance is always truthy.</summary>
    NotNone,
}

/// <param name="Name">The keyword, as PEFT spells it.</param>
/// <param name="Owner">The dataclass that declares it (PeftConfigMixin, PeftConfig or LoraConfig).</param>
/// <param name="Role">What MoeLora does with it.</param>
/// <param name="Why">Why that role is right (for a refusal: what PEFT would do that cannot be planned).</param>
/// <param name="Activity">For a refused field: when it counts as set.</param>
public sealed record LoraField(string Name, string Owner, LoraFieldRole Role, string Why, FieldActivity Activity = FieldActivity.Truthy)
{
    public bool IsActive(JsonNode? value) => Activity == FieldActivity.NotNone ? value is not null : PyJson.Truthy(value);
}

/// <summary>
/// Every keyword PEFT 0.21's <c>LoraConfig(**kwargs)</c> accepts (its dataclass fields and those of PeftConfig and
/// PeftConfigMixin), each with what MoeLora does with it. This is the one place that decides: a key missing here is
/// rejected as PEFT rejects it, so a field PEFT adds later cannot be ignored silently.
/// </summary>
public static class LoraConfigFields
{
    public static IReadOnlyList<LoraField> All { get; } =
    [
        // PeftConfigMixin
        new("task_type", "PeftConfigMixin", LoraFieldRole.Planned, "validated against TaskType; SEQ_CLS/TOKEN_CLS/QUESTION_ANS add their head names to modules_to_save"),
        new("peft_type", "PeftConfigMixin", LoraFieldRole.NoEffect, "__post_init__ overwrites it with LORA; in an adapter_config.json another type selects another config class and is refused"),
        new("auto_mapping", "PeftConfigMixin", LoraFieldRole.NoEffect, "only tells AutoPeftModel which base class to load"),
        new("peft_version", "PeftConfigMixin", LoraFieldRole.NoEffect, "records the PEFT version that wrote the file; 0.21 reads nothing from it"),
        // PeftConfig
        new("base_model_name_or_path", "PeftConfig", LoraFieldRole.NoEffect, "names the base model; the model analysed is the one given to MoeLora"),
        new("revision", "PeftConfig", LoraFieldRole.NoEffect, "a Hub revision of the base model"),
        new("inference_mode", "PeftConfig", LoraFieldRole.Planned, "true freezes every adapter (get_peft_model); refused as a keyword, while in an adapter_config.json it is what save_pretrained writes and from_pretrained(is_trainable=True) turns off"),
        // LoraConfig
        new("r", "LoraConfig", LoraFieldRole.Planned, "the rank"),
        new("target_modules", "LoraConfig", LoraFieldRole.Planned, "module matching"),
        new("exclude_modules", "LoraConfig", LoraFieldRole.Planned, "module matching"),
        new("lora_alpha", "LoraConfig", LoraFieldRole.Planned, "scaling"),
        new("lora_dropout", "LoraConfig", LoraFieldRole.Planned, "no parameters, but ParamWrapper refuses it"),
        new("fan_in_fan_out", "LoraConfig", LoraFieldRole.Planned, "no parameters; the first nn.Linear resets it to False, ParamWrapper refuses it before that"),
        new("bias", "LoraConfig", LoraFieldRole.Planned, "which base biases train"),
        new("use_rslora", "LoraConfig", LoraFieldRole.Planned, "scaling alpha/sqrt(r)"),
        new("modules_to_save", "LoraConfig", LoraFieldRole.Planned, "trainable copies"),
        new("init_lora_weights", "LoraConfig", LoraFieldRole.Planned, "True/False/gaussian change values only; mica freezes lora_B; orthogonal needs an even r; data- or weight-rewriting methods are refused (see LoraInit)"),
        new("layers_to_transform", "LoraConfig", LoraFieldRole.Planned, "layer filter"),
        new("layers_pattern", "LoraConfig", LoraFieldRole.Planned, "layer filter"),
        new("rank_pattern", "LoraConfig", LoraFieldRole.Planned, "per-module r"),
        new("alpha_pattern", "LoraConfig", LoraFieldRole.Planned, "per-module alpha"),
        new("megatron_config", "LoraConfig", LoraFieldRole.Refused, "replaces Megatron parallel linears with LoraParallelLinear"),
        new("megatron_core", "LoraConfig", LoraFieldRole.NoEffect, "the Megatron module name, read only together with megatron_config"),
        new("trainable_token_indices", "LoraConfig", LoraFieldRole.Planned, "adds token_adapter.trainable_tokens_delta (tokens x dim) on the embedding"),
        new("loftq_config", "LoraConfig", LoraFieldRole.NoEffect, "read only with init_lora_weights='loftq' (refused); otherwise __post_init__ warns and empties it"),
        new("eva_config", "LoraConfig", LoraFieldRole.NoEffect, "read only with init_lora_weights='eva' (refused); otherwise __post_init__ warns that it is ignored"),
        new("corda_config", "LoraConfig", LoraFieldRole.NoEffect, "read only with init_lora_weights='corda' (refused); otherwise __post_init__ warns that it is ignored"),
        new("lora_ga_config", "LoraConfig", LoraFieldRole.NoEffect, "read only with init_lora_weights='lora_ga' (refused)"),
        new("use_dora", "LoraConfig", LoraFieldRole.Planned, "adds lora_magnitude_vector"),
        new("velora_config", "LoraConfig", LoraFieldRole.Refused, "a LoRA variant (VeLoRA) that swaps lora_A's backward and changes activation memory; Embedding and ParamWrapper reject it", FieldActivity.NotNone),
        new("alora_invocation_tokens", "LoraConfig", LoraFieldRole.Refused, "a LoRA variant (aLoRA) that only Linear layers accept"),
        new("use_qalora", "LoraConfig", LoraFieldRole.Refused, "QALoRA pools inputs of GPTQ-quantised layers"),
        new("qalora_group_size", "LoraConfig", LoraFieldRole.NoEffect, "read only with use_qalora (refused)"),
        new("monteclora_config", "LoraConfig", LoraFieldRole.Refused, "a LoRA variant (MonteCLoRA) that adds trainable priors per layer", FieldActivity.NotNone),
        new("layer_replication", "LoraConfig", LoraFieldRole.Refused, "stacks shared copies of decoder layers, each with its own adapter"),
        new("runtime_config", "LoraConfig", LoraFieldRole.NoEffect, "runtime only (ephemeral_gpu_offload); to_dict drops it and from_json_file removes it with a warning"),
        new("lora_bias", "LoraConfig", LoraFieldRole.Planned, "adds lora_B.bias"),
        new("target_parameters", "LoraConfig", LoraFieldRole.Planned, "ParamWrapper targets"),
        new("use_bdlora", "LoraConfig", LoraFieldRole.Refused, "a LoRA variant (block-diagonal LoRA) with block-shaped factors", FieldActivity.NotNone),
        new("arrow_config", "LoraConfig", LoraFieldRole.Refused, "a LoRA variant (Arrow routing over several adapters)", FieldActivity.NotNone),
        new("kasa_config", "LoraConfig", LoraFieldRole.Refused, "a LoRA variant (KaSA) that truncates base weights by SVD and adds lora_diag", FieldActivity.NotNone),
        new("ensure_weight_tying", "LoraConfig", LoraFieldRole.Planned, "ties adapters and copies of tied embeddings"),
    ];

    private static readonly Dictionary<string, LoraField> ByName = All.ToDictionary(f => f.Name, StringComparer.Ordinal);

    public static LoraField? Find(string name) => ByName.GetValueOrDefault(name);

    /// <summary>The field a mistyped key most likely meant (edit distance, or the key as a part of a field name), or null.</summary>
    public static string? Suggest(string key)
    {
        var best = All.Select(f => (f.Name, d: Distance(key, f.Name))).MinBy(x => x.d);
        if (best.d <= Math.Max(2, key.Length / 3)) return best.Name;
        var containing = All.Where(f => key.Length >= 3 && f.Name.Split('_').Contains(key, StringComparer.Ordinal)).Select(f => f.Name).ToList();
        return containing.Count == 1 ? containing[0] : null;
    }

    private static int Distance(string a, string b)
    {
        var d = new int[a.Length + 1, b.Length + 1];
        for (var i = 0; i <= a.Length; i++) d[i, 0] = i;
        for (var j = 0; j <= b.Length; j++) d[0, j] = j;
        for (var i = 1; i <= a.Length; i++)
            for (var j = 1; j <= b.Length; j++)
                d[i, j] = Math.Min(Math.Min(d[i - 1, j] + 1, d[i, j - 1] + 1), d[i - 1, j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1));
        return d[a.Length, b.Length];
    }
}

/// <summary>Python's view of JSON values: truthiness and repr, for PEFT's checks and messages.</summary>
internal static class PyJson
{
    public static bool Truthy(JsonNode? v) => v switch
    {
        null => false,
        JsonArray a => a.Count > 0,
        JsonObject o => o.Count > 0,
        JsonValue jv when jv.TryGetValue<bool>(out var b) => b,
        JsonValue jv when jv.TryGetValue<string>(out var s) => s.Length > 0,
        JsonValue jv when JsonNumbers.TryDouble(jv, out var d) => d != 0,
        _ => true,
    };

    /// <summary>A short Python-like rendering for messages (True/False/None, 'str', JSON otherwise).</summary>
    public static string Repr(JsonNode? v) => v switch
    {
        null => "None",
        JsonValue jv when jv.TryGetValue<bool>(out var b) => b ? "True" : "False",
        JsonValue jv when jv.TryGetValue<string>(out var s) => $"'{s}'",
        _ => v.ToJsonString(),
    };
}
