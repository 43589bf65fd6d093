using System.Text.Json;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;

namespace MoeLora.Core.Util;

/// <summary>
/// JSON the user supplies (configs, adapter configs, LoRA configs, JSONL rows): a parse failure names the file, the
/// position and the reason on one line, e.g. <c>lora.json is not valid JSON: line 3, column 7: ...</c>.
/// </summary>
public static partial class UserJson
{
    /// <summary>"line L, column C: reason" (1-based, as editors count) from System.Text.Json's exception.</summary>
    public static string Describe(JsonException e)
    {
        // System.Text.Json appends "Path: $ | LineNumber: 0 | BytePositionInLine: 1." (0-based); say it once, 1-based.
        var reason = Position().Replace(e.Message.Split('\n')[0], "").Trim();
        if (reason.Length == 0) reason = "malformed JSON";
        return e.LineNumber is long line
            ? $"line {line + 1}, column {(e.BytePositionInLine ?? 0) + 1}: {reason}"
            : reason;
    }

    /// <summary>Parses <paramref name="text"/> as one JSON object; anything else is a <see cref="UserInputException"/> naming <paramref name="source"/>.</summary>
    public static JsonObject ParseObject(string text, string source, bool allowTrailingCommas = false)
    {
        JsonNode? node;
        try
        {
            node = JsonNode.Parse(text, documentOptions: new JsonDocumentOptions { AllowTrailingCommas = allowTrailingCommas });
        }
        catch (JsonException e)
        {
            throw new UserInputException($"{source} is not valid JSON: {Describe(e)}");
        }
        return node as JsonObject
            ?? throw new UserInputException($"{source} must hold a JSON object, not {(node is null ? "null" : node.GetValueKind().ToString().ToLowerInvariant())}");
    }

    [GeneratedRegex(@"\s*(Path: [^|]*\|\s*)?LineNumber: \d+ \| BytePositionInLine: \d+\.?\s*$")]
    private static partial Regex Position();
}
