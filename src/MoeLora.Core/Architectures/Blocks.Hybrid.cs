using MoeLora.Core.Config;

namespace MoeLora.Core.Architectures;

/// <summary>Building blocks for hybrid (attention / linear-attention / Mamba) decoders.</summary>
internal static partial class Blocks
{
    /// <summary>
    /// <c>layer_types</c> with transformers' legacy names mapped to the current ones (<c>remap_legacy_layer_types</c>:
    /// mamba → linear_attention, attention → full_attention); null when the field is absent or null.
    /// </summary>
    public static IReadOnlyList<string>? LayerTypes(ModelConfig c, string name = "layer_types") =>
        c.StringList(name)?.Select(t => t switch
        {
            "mamba" => "linear_attention",
            "attention" => "full_attention",
            _ => t,
        }).ToList();

    /// <summary>Fails with one line when a layer type is not one the family builds.</summary>
    public static void CheckLayerTypes(IReadOnlyList<string> types, string field, params string[] valid)
    {
        var bad = types.FirstOrDefault(t => !valid.Contains(t));
        if (bad is not null)
            throw new ConfigException($"config field '{field}' holds '{bad}'; expected one of {string.Join(", ", valid)}");
    }
}
