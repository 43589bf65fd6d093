using System.Text.Json;

namespace MoeLora.Sources.Safetensors;

/// <summary>
/// Parses and validates the JSON header of a safetensors file. Every rule of the format is checked, so a header that
/// passes describes a file whose tensors can be located exactly; anything else is a <see cref="SafetensorsFormatException"/>.
/// </summary>
public static class SafetensorsHeaderParser
{
    private const string MetadataKey = "__metadata__";

    // The deepest legal value is a shape array inside a tensor entry inside the root object.
    private static readonly JsonDocumentOptions JsonOptions = new() { MaxDepth = 4 };

    /// <summary>Parses header bytes (without the leading 8-byte length).</summary>
    /// <param name="json">The header exactly as stored, possibly padded with trailing spaces.</param>
    /// <param name="dataLength">Length of the data section when the file size is known; coverage is then checked.</param>
    /// <param name="source">Names the file in error messages.</param>
    public static SafetensorsHeader Parse(ReadOnlyMemory<byte> json, long? dataLength, string source)
    {
        if (json.Length == 0 || json.Span[0] != (byte)'{')
            throw Error(source, "the header does not start with '{'");
        // JsonDocument only decodes strings when they are read, so bad UTF-8 would surface later as another exception.
        if (!System.Text.Unicode.Utf8.IsValid(json.Span))
            throw Error(source, "the header is not valid UTF-8");

        JsonDocument document;
        try
        {
            document = JsonDocument.Parse(json, JsonOptions);
        }
        catch (JsonException ex)
        {
            throw Error(source, $"the header is not valid JSON ({Clip(MoeLora.Core.Util.UserJson.Describe(ex))})");
        }

        using (document)
        {
            if (document.RootElement.ValueKind != JsonValueKind.Object)
                throw Error(source, "the header is not a JSON object");

            var tensors = new List<SafetensorsTensor>();
            var names = new HashSet<string>(StringComparer.Ordinal);
            IReadOnlyDictionary<string, string>? metadata = null;

            foreach (JsonProperty property in document.RootElement.EnumerateObject())
            {
                if (!names.Add(property.Name))
                    throw Error(source, $"the name '{Clip(property.Name)}' appears twice");
                if (property.Name == MetadataKey)
                    metadata = ParseMetadata(property.Value, source);
                else
                    tensors.Add(ParseTensor(property.Name, property.Value, source));
            }

            tensors.Sort(static (a, b) => a.DataBegin != b.DataBegin ? a.DataBegin.CompareTo(b.DataBegin) : a.DataEnd.CompareTo(b.DataEnd));
            long end = CheckLayout(tensors, source);
            if (dataLength is long expected && end != expected)
            {
                throw Error(source, end < expected
                    ? $"the tensors cover {end} bytes but the data section is {expected} bytes (the file has trailing bytes or is not a safetensors file)"
                    : $"the tensors need {end} bytes but the data section is only {expected} bytes (the file is truncated)");
            }
            return new SafetensorsHeader(tensors, metadata ?? new Dictionary<string, string>(), json.Length, end);
        }
    }

    private static Dictionary<string, string> ParseMetadata(JsonElement value, string source)
    {
        if (value.ValueKind != JsonValueKind.Object)
            throw Error(source, "__metadata__ must be an object of strings");
        var map = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (JsonProperty entry in value.EnumerateObject())
        {
            if (entry.Value.ValueKind != JsonValueKind.String)
                throw Error(source, $"__metadata__ value '{Clip(entry.Name)}' is not a string");
            if (!map.TryAdd(entry.Name, entry.Value.GetString()!))
                throw Error(source, $"__metadata__ key '{Clip(entry.Name)}' appears twice");
        }
        return map;
    }

    private static SafetensorsTensor ParseTensor(string name, JsonElement value, string source)
    {
        string who = $"tensor '{Clip(name)}'";
        if (value.ValueKind != JsonValueKind.Object)
            throw Error(source, $"{who} is not an object");

        JsonElement dtypeElement = Required(value, "dtype", who, source);
        if (dtypeElement.ValueKind != JsonValueKind.String || !SafetensorsDtypes.TryParse(dtypeElement.GetString()!, out SafetensorsDtype dtype))
            throw Error(source, $"{who} has unknown dtype {Clip(dtypeElement.GetRawText())}");

        JsonElement shapeElement = Required(value, "shape", who, source);
        if (shapeElement.ValueKind != JsonValueKind.Array)
            throw Error(source, $"{who} has a shape that is not an array");
        var shape = new long[shapeElement.GetArrayLength()];
        int i = 0;
        foreach (JsonElement dim in shapeElement.EnumerateArray())
            shape[i++] = NonNegative(dim, $"{who} shape", source);

        JsonElement offsets = Required(value, "data_offsets", who, source);
        if (offsets.ValueKind != JsonValueKind.Array || offsets.GetArrayLength() != 2)
            throw Error(source, $"{who} needs data_offsets [begin, end]");
        long begin = NonNegative(offsets[0], $"{who} data_offsets", source);
        long end = NonNegative(offsets[1], $"{who} data_offsets", source);
        if (end < begin)
            throw Error(source, $"{who} ends (byte {end}) before it begins (byte {begin})");

        long expectedBytes = ExpectedBytes(shape, dtype, who, source);
        if (end - begin != expectedBytes)
            throw Error(source, $"{who} is {dtype.Code()} [{string.Join(", ", shape)}], which needs {expectedBytes} bytes, but its data_offsets span {end - begin}");

        return new SafetensorsTensor(name, dtype, shape, begin, end);
    }

    private static long ExpectedBytes(long[] shape, SafetensorsDtype dtype, string who, string source)
    {
        try
        {
            long elements = 1;
            foreach (long dim in shape) elements = checked(elements * dim);
            long bits = checked(elements * dtype.Bits());
            if (bits % 8 != 0)
                throw Error(source, $"{who} has {elements} {dtype.Code()} elements, which do not fill whole bytes");
            return bits / 8;
        }
        catch (OverflowException)
        {
            throw Error(source, $"{who} has a shape too large to address");
        }
    }

    // Tensors must tile the data section from byte 0 with no gap and no overlap (sorted by offset beforehand).
    private static long CheckLayout(List<SafetensorsTensor> tensors, string source)
    {
        long position = 0;
        SafetensorsTensor? previous = null;
        foreach (SafetensorsTensor tensor in tensors)
        {
            if (tensor.DataBegin < position)
                throw Error(source, $"tensors '{Clip(previous!.Name)}' and '{Clip(tensor.Name)}' overlap (bytes {tensor.DataBegin}-{position})");
            if (tensor.DataBegin > position)
                throw Error(source, previous is null
                    ? $"the data section starts with {tensor.DataBegin} unused bytes before tensor '{Clip(tensor.Name)}'"
                    : $"bytes {position}-{tensor.DataBegin} between tensors '{Clip(previous.Name)}' and '{Clip(tensor.Name)}' belong to no tensor");
            position = tensor.DataEnd;
            previous = tensor;
        }
        return position;
    }

    private static JsonElement Required(JsonElement entry, string key, string who, string source) =>
        entry.TryGetProperty(key, out JsonElement value) ? value : throw Error(source, $"{who} has no \"{key}\"");

    private static long NonNegative(JsonElement element, string what, string source) =>
        element.ValueKind == JsonValueKind.Number && element.TryGetInt64(out long value) && value >= 0
            ? value
            : throw Error(source, $"{what} holds {Clip(element.GetRawText())}, not a non-negative integer");

    internal static SafetensorsFormatException Error(string source, string problem) =>
        new($"{source} is not a valid safetensors file: {problem}.");

    // Names and values come from untrusted files; keep messages one readable line.
    private static string Clip(string text)
    {
        string flat = text.ReplaceLineEndings(" ");
        return flat.Length <= 80 ? flat : flat[..77] + "...";
    }
}
