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

    /// <summary>
    /// <c>time_step_limit</c> (default (0, ∞)); its entries may be numbers, strings Python's <c>float()</c> reads
    /// ("inf", "-inf", "Infinity") or transformers' encoding of non-finite floats (<c>{"__float__": "Infinity"}</c>).
    /// Null when it is null or unreadable: only the runtime needs it, so the analysis never fails on it.
    /// </summary>
    public static (double Min, double Max)? TimeStepLimit(ModelConfig c)
    {
        if (!c.Json.TryGetPropertyValue("time_step_limit", out var node)) return (0.0, double.PositiveInfinity);
        if (node is not System.Text.Json.Nodes.JsonArray { Count: 2 } pair) return null;
        return Bound(pair[0]) is { } lo && Bound(pair[1]) is { } hi ? (lo, hi) : null;

        static double? Bound(System.Text.Json.Nodes.JsonNode? v)
        {
            if (Util.JsonNumbers.TryDouble(v, out var d)) return d;
            var text = v is System.Text.Json.Nodes.JsonObject o ? o["__float__"] : v;
            if (text is not System.Text.Json.Nodes.JsonValue t || !t.TryGetValue(out string? s)) return null;
            return s.Trim().ToLowerInvariant() switch
            {
                "inf" or "+inf" or "infinity" or "+infinity" => double.PositiveInfinity,
                "-inf" or "-infinity" => double.NegativeInfinity,
                var other => double.TryParse(other, System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out var x) ? x : null,
            };
        }
    }
}
