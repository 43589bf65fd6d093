using System.Text.Json.Nodes;

namespace MoeLora.Core.Peft;

/// <summary>What <c>init_lora_weights</c> makes <c>update_layer</c> do (PEFT 0.21, tuners/lora/layer.py).</summary>
public enum LoraInitKind
{
    /// <summary>True: kaiming A, zero B. Values only.</summary>
    Default,
    /// <summary>False: random A and B (nothing is initialised). Values only.</summary>
    None,
    /// <summary>"gaussian" in any case (<c>init_lora_weights.lower() == "gaussian"</c>). Values only.</summary>
    Gaussian,
    /// <summary>
    /// Exactly "mica": mica_init (B from the base weight's minor singular vectors, A zero) and the MiCA variant, which
    /// freezes lora_B (<c>frozen_peft_weight_names</c>), so only lora_A trains. Linear and Embedding only.
    /// </summary>
    Mica,
    /// <summary>
    /// "mica" in another case ("MiCA"): Linear/Embedding dispatch on <c>.lower()</c> and run mica_init, but the variant
    /// is looked up by equality, so nothing is frozen; ParamWrapper has no mica branch and fails as an unknown value.
    /// </summary>
    MicaInitOnly,
    /// <summary>"orthogonal": A and B replaced by orthogonal factors of the same shapes; needs an even r.</summary>
    Orthogonal,
    /// <summary>pissa*, corda*, olora, loftq, eva, lora_ga: refused (<see cref="LoraInit.RefusalReason"/>).</summary>
    Refused,
    /// <summary>Any other string: reset_lora_parameters raises "Unknown initialization" on Linear and ParamWrapper layers.</summary>
    Unknown,
}

public static class LoraInit
{
    public static LoraInitKind Classify(JsonNode? value)
    {
        if (value is JsonValue b && b.TryGetValue<bool>(out var flag)) return flag ? LoraInitKind.Default : LoraInitKind.None;
        if (value is not JsonValue s || !s.TryGetValue<string>(out var text))
            throw new PeftConfigException($"init_lora_weights must be true, false or a method name, got {PyJson.Repr(value)}");
        // The order of update_layer's dispatch (startswith / lower() / == as PEFT writes each test).
        if (text.StartsWith("pissa", StringComparison.Ordinal) || text.StartsWith("corda", StringComparison.Ordinal)
            || text.Equals("olora", StringComparison.OrdinalIgnoreCase))
            return LoraInitKind.Refused;
        if (text.Equals("mica", StringComparison.OrdinalIgnoreCase)) return text == "mica" ? LoraInitKind.Mica : LoraInitKind.MicaInitOnly;
        if (text is "loftq" or "eva" or "lora_ga") return LoraInitKind.Refused;
        if (text == "orthogonal") return LoraInitKind.Orthogonal;
        return text.Equals("gaussian", StringComparison.OrdinalIgnoreCase) ? LoraInitKind.Gaussian : LoraInitKind.Unknown;
    }

    /// <summary>Why a refused method cannot be planned (one line), or null.</summary>
    public static string? RefusalReason(JsonNode? value)
    {
        if (Classify(value) != LoraInitKind.Refused) return null;
        var text = value!.GetValue<string>();
        var what = text switch
        {
            _ when text.StartsWith("pissa", StringComparison.Ordinal) => "PiSSA rewrites each base weight from its SVD (and fails on fused expert modules, which have no .weight)",
            _ when text.StartsWith("corda", StringComparison.Ordinal) => "CorDA needs preprocess_corda's covariance data and rewrites the base weights",
            "loftq" => "LoftQ quantises the base weights itself",
            "eva" => "EVA initialises from data and may redistribute ranks (rho), so the ranks are not known before training data is seen",
            "lora_ga" => "LoRA-GA initialises from gradients and rewrites the base weights",
            _ => "OLoRA rewrites each base weight by a QR decomposition",
        };
        return $"init_lora_weights='{text}' is not supported: {what}; MoeLora cannot plan it yet";
    }

    /// <summary>Python's <c>f"{init_lora_weights=}"</c> rendering.</summary>
    public static string PyRepr(JsonNode? value) => PyJson.Repr(value);
}
