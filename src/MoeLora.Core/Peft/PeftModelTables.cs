namespace MoeLora.Core.Peft;

/// <summary>Per-model-type tables that PEFT and transformers keep (constants.py, conversion_mapping.py).</summary>
public static class PeftModelTables
{
    /// <summary>
    /// <c>TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING</c> for the supported types: used when
    /// <c>target_modules</c> is None. MoE types such as qwen2_moe, qwen3_moe, gpt_oss and deepseek have no default.
    /// </summary>
    public static IReadOnlyList<string>? DefaultTargetModules(string modelType) => modelType switch
    {
        "llama" or "llama4" or "mistral" or "mixtral" or "qwen2" or "qwen3" => ["q_proj", "v_proj"],
        _ => null,
    };

    /// <summary>
    /// The v4-to-v5 rewrite rules PEFT applies to a model type under transformers 5 (peft ≥ 0.19): transformers'
    /// <c>_MODEL_TO_CONVERSION_PATTERN</c> (5.17) plus PEFT's forced <c>mixtral → mixtral</c>, restricted to the
    /// patterns PEFT has a name map for. qwen2_moe has no self-entry, so it is not converted.
    /// </summary>
    public static MoeConversionRules? ConversionRules(string modelType) => modelType switch
    {
        "mixtral" => MoeConversionRules.Mixtral,
        "qwen3_moe" or "deepseek_v2" or "deepseek_v3" or "olmoe" or "qwen3_next" or "qwen3_omni_moe" or "glm4_moe" => MoeConversionRules.Qwen2Moe,
        _ => null,
    };

    /// <summary>
    /// Whether transformers 5 has a checkpoint conversion mapping (per-expert tensors on disk, fused at runtime).
    /// Used for the transformers patch that orients expert LoRA under peft ≤ 0.18.
    /// </summary>
    public static bool HasCheckpointConversion(string modelType) => modelType is
        "mixtral" or "qwen2_moe" or "phimoe" or "qwen3_moe" or "deepseek_v2" or "deepseek_v3" or "olmoe" or "qwen3_next"
        or "glm4_moe" or "granitemoe" or "granitemoeshared" or "jamba";
}

/// <summary>PEFT's <c>_MOE_TARGET_MODULE_MAPPING</c> and <c>_MOE_FUSED_TARGETS</c> for one pattern.</summary>
/// <param name="Pattern">The pattern name (<c>mixtral</c> or <c>qwen2_moe</c>).</param>
/// <param name="Map">Old v4 module name → new target_parameters entry, in PEFT's dict order.</param>
/// <param name="FusedGateUp">The two old names fused into <c>gate_up_proj</c>, in order.</param>
public sealed record MoeConversionRules(string Pattern, IReadOnlyList<KeyValuePair<string, string>> Map, IReadOnlyList<string> FusedGateUp)
{
    public static readonly MoeConversionRules Mixtral = new("mixtral",
        [new("gate", "gate.weight"), new("w1", "gate_up_proj"), new("w3", "gate_up_proj"), new("w2", "down_proj")],
        ["w1", "w3"]);

    public static readonly MoeConversionRules Qwen2Moe = new("qwen2_moe",
        [new("gate", "gate.weight"), new("gate_proj", "gate_up_proj"), new("up_proj", "gate_up_proj"), new("down_proj", "down_proj")],
        ["gate_proj", "up_proj"]);
}
