using System.Text.Json.Nodes;

namespace MoeLora.Core.Util;

/// <summary>Reads numbers from JsonValues whether they were parsed from text or created from CLR values.</summary>
internal static class JsonNumbers
{
    public static bool TryDouble(JsonNode? node, out double value)
    {
        value = 0;
        if (node is not JsonValue v) return false;
        if (v.TryGetValue(out double d)) { value = d; return true; }
        if (v.TryGetValue(out long l)) { value = l; return true; }
        if (v.TryGetValue(out int i)) { value = i; return true; }
        if (v.TryGetValue(out float f)) { value = f; return true; }
        if (v.TryGetValue(out decimal m)) { value = (double)m; return true; }
        return false;
    }

    /// <summary>An integral value (4096 or 4096.0).</summary>
    public static bool TryLong(JsonNode? node, out long value)
    {
        value = 0;
        if (node is JsonValue v && v.TryGetValue(out long l)) { value = l; return true; }
        if (node is JsonValue w && w.TryGetValue(out int i)) { value = i; return true; }
        if (!TryDouble(node, out var d) || d != Math.Floor(d) || Math.Abs(d) > 9e15) return false;
        value = (long)d;
        return true;
    }
}
