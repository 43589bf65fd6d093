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
        "nemotron_h" => ["q_proj", "k_proj", "v_proj", "o_proj"],
        _ => null,
    };

    /// <summary>
    /// The v4-to-v5 rewrite rules PEFT applies to a model type under transformers 5 (peft ≥ 0.19): only types with a
    /// checkpoint conversion mapping whose entry in transformers' <c>_MODEL_TO_CONVERSION_PATTERN</c> (5.17) names one
    /// of PEFT's two patterns, plus PEFT's forced <c>mixtral → mixtral</c>. qwen2_moe has no self-entry, so it is not
    /// converted. The lists are transformers 5.17's own tables, read on the device (tests' Data/oracle-moe/moe_types.json).
    /// </summary>
    public static MoeConversionRules? ConversionRules(string modelType) =>
        MixtralPatternTypes.Contains(modelType) ? MoeConversionRules.Mixtral
        : Qwen2MoePatternTypes.Contains(modelType) ? MoeConversionRules.Qwen2Moe
        : null;

    /// <summary>
    /// Whether PEFT ≥ 0.19 reads a per-expert (transformers-4 layout) adapter of this type: types whose experts are not
    /// fused at runtime keep their per-expert modules; fused types need a <see cref="ConversionRules"/> entry, without
    /// which PEFT (0.21 checked) reports the per-expert keys as unexpected.
    /// </summary>
    public static bool ReadsPerExpertAdapters(string modelType) =>
        !HasCheckpointConversion(modelType) || ConversionRules(modelType) is not null;

    /// <summary>
    /// Whether transformers 5 has a checkpoint conversion mapping (<c>get_checkpoint_conversion_mapping</c> is not None:
    /// per-expert tensors on disk, fused at runtime). Used for the transformers patch that orients expert LoRA under
    /// peft ≤ 0.18.
    /// </summary>
    public static bool HasCheckpointConversion(string modelType) => CheckpointConversionTypes.Contains(modelType);

    /// <summary>
    /// <c>_check_lora_target_modules_mamba</c>: for these model types PEFT refuses LoRA on modules whose leaf name is
    /// <c>out_proj</c> or <c>conv1d</c> (the Mamba mixer's), wherever they sit.
    /// </summary>
    public static bool RejectsMambaTargets(string modelType, string leafName) =>
        MambaModelTypes.Contains(modelType) && leafName is "out_proj" or "conv1d";

    /// <summary>
    /// nn.Linear subclasses whose own forward reshapes the weight, so PEFT 0.21 wraps them as a plain
    /// <c>lora.Linear</c> (they count as adapters and are saved) but the LoRA term it adds has the wrong shape and the
    /// forward fails: why, per transformers class name; null for every other class.
    /// </summary>
    public static string? LoraForwardFails(string className) => className switch
    {
        // transformers 5.17: the weight [groups·rank, in] is used block-diagonally, the output is [..., groups, rank],
        // while lora_B(lora_A(x)) gives [..., groups, groups·rank].
        "DeepseekV4GroupedLinear" => "a block-diagonal grouped projection: its output is [..., groups, rank] per group, " +
            "while the LoRA term PEFT adds is [..., groups, groups·rank]",
        _ => null,
    };

    private static readonly HashSet<string> MambaModelTypes = new(StringComparer.Ordinal)
    {
        "falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h"
    };

    private static readonly HashSet<string> MixtralPatternTypes = new(StringComparer.Ordinal)
    {
        "minimax", "minimax_m2", "mixtral"
    };

    private static readonly HashSet<string> Qwen2MoePatternTypes = new(StringComparer.Ordinal)
    {
        "afmoe", "cohere2_moe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe", "exaone_moe",
        "flex_olmo", "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm_moe_dsa", "hunyuan_v1_moe", "longcat_flash",
        "mellum", "olmoe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_thinker", "solar_open"
    };

    private static readonly HashSet<string> CheckpointConversionTypes = new(StringComparer.Ordinal)
    {
        "afmoe", "aria", "axk1", "axk2", "cohere2_moe", "deepseek_ocr2", "deepseek_v2", "deepseek_v3",
        "deepseek_v32", "deepseek_v4", "dots1", "ernie4_5_moe", "ernie4_5_vl_moe", "exaone_moe", "flex_olmo",
        "glm4_moe", "glm4_moe_lite", "glm4v_moe", "glm5_next", "glm_moe_dsa", "granitemoe", "granitemoehybrid",
        "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "hy_v4", "inkling_mm_model", "jamba", "kimi_k25",
        "kimi_linear", "laguna", "lfm2_moe", "longcat_flash", "mellum", "mimo_v2_flash", "minimax", "minimax_m2",
        "minimax_m3_vl", "mixtral", "nemotron_h", "olmoe", "phimoe", "qwen2_moe", "qwen3_5_moe_text", "qwen3_moe",
        "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_vl_moe", "qwen4_exp_text", "solar_open",
        "step3p7"
    };
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
