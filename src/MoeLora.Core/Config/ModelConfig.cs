using System.Text.Json;
using System.Text.Json.Nodes;
using MoeLora.Core.Util;

namespace MoeLora.Core.Config;

/// <summary>
/// A read-only view of a Hugging Face <c>config.json</c>. Accessors take the default that the transformers
/// config class would apply, so each architecture file states its own defaults next to where it uses them.
/// </summary>
/// <remarks>
/// Two null conventions exist in transformers and both are exposed: <see cref="Int(string,long)"/> treats an
/// explicit JSON <c>null</c> like a missing key (the modeling code does <c>x or default</c>), while
/// <see cref="IntOrNull"/> keeps an explicit null as "no value" (e.g. DeepSeek's <c>q_lora_rank: null</c>
/// means "no low-rank query projection").
/// </remarks>
public sealed class ModelConfig
{
    private readonly JsonObject _json;

    public ModelConfig(JsonObject json, ModelConfig? parent = null)
    {
        _json = json;
        Parent = parent;
    }

    /// <summary>The enclosing config for nested ones (<c>text_config</c>, <c>vision_config</c>).</summary>
    public ModelConfig? Parent { get; }

    public JsonObject Json => _json;

    /// <summary>Parses config.json text; throws <see cref="ConfigException"/> with a one-line reason.</summary>
    public static ModelConfig Parse(string json, string source)
    {
        JsonNode? node;
        try
        {
            node = JsonNode.Parse(json, documentOptions: new JsonDocumentOptions { AllowTrailingCommas = true });
        }
        catch (JsonException e)
        {
            throw new ConfigException($"{source} is not valid JSON: {UserJson.Describe(e)}");
        }
        if (node is not JsonObject obj)
            throw new ConfigException($"{source} must hold a JSON object, not {node?.GetValueKind().ToString() ?? "null"}");
        return new ModelConfig(obj);
    }

    public string? ModelType => String("model_type");

    public bool Has(string name) => _json.TryGetPropertyValue(name, out var v) && v is not null;

    public bool IsExplicitNull(string name) => _json.TryGetPropertyValue(name, out var v) && v is null;

    /// <summary>A nested config object such as <c>text_config</c>, or null when absent.</summary>
    public ModelConfig? Sub(string name) =>
        _json.TryGetPropertyValue(name, out var v) && v is JsonObject o ? new ModelConfig(o, this) : null;

    public long Int(string name, long @default) => IntOrNull(name, @default) ?? @default;

    /// <summary>The integer value; <paramref name="defaultIfMissing"/> when the key is absent; null when it is JSON null.</summary>
    public long? IntOrNull(string name, long? defaultIfMissing)
    {
        if (!_json.TryGetPropertyValue(name, out var v)) return defaultIfMissing;
        if (v is null) return null;
        return ReadInt(name, v);
    }

    /// <summary>The first of several alias keys that is present (e.g. <c>n_routed_experts</c> / <c>num_experts</c>).</summary>
    public long? FirstInt(params string[] names)
    {
        foreach (var n in names)
        {
            if (Has(n)) return ReadInt(n, _json[n]!);
        }
        return null;
    }

    public bool Bool(string name, bool @default)
    {
        if (!_json.TryGetPropertyValue(name, out var v) || v is null) return @default;
        if (v is JsonValue jv && jv.TryGetValue<bool>(out var b)) return b;
        throw new ConfigException($"config field '{name}' must be true or false, got {v.ToJsonString()}");
    }

    public double Double(string name, double @default)
    {
        if (!_json.TryGetPropertyValue(name, out var v) || v is null) return @default;
        if (JsonNumbers.TryDouble(v, out var d)) return d;
        throw new ConfigException($"config field '{name}' must be a number, got {v.ToJsonString()}");
    }

    public string? String(string name, string? @default = null)
    {
        if (!_json.TryGetPropertyValue(name, out var v) || v is null) return @default;
        if (v is JsonValue jv && jv.TryGetValue<string>(out var s)) return s;
        throw new ConfigException($"config field '{name}' must be a string, got {v.ToJsonString()}");
    }

    /// <summary>An integer list; null when absent or null.</summary>
    public IReadOnlyList<long>? IntList(string name)
    {
        if (!_json.TryGetPropertyValue(name, out var v) || v is null) return null;
        if (v is not JsonArray arr) throw new ConfigException($"config field '{name}' must be a list of integers, got {v.ToJsonString()}");
        return arr.Select(x => x is null ? throw new ConfigException($"config field '{name}' holds a null") : ReadInt(name, x)).ToList();
    }

    /// <summary>A list of numbers (longrope's <c>short_factor</c>); null when absent or null.</summary>
    public IReadOnlyList<double>? DoubleList(string name)
    {
        if (!_json.TryGetPropertyValue(name, out var v) || v is null) return null;
        if (v is not JsonArray arr) throw new ConfigException($"config field '{name}' must be a list of numbers, got {v.ToJsonString()}");
        return arr.Select(x => x is not null && JsonNumbers.TryDouble(x, out var d) ? d
            : throw new ConfigException($"config field '{name}' must be a list of numbers")).ToList();
    }

    /// <summary>A list of strings; null when absent or null.</summary>
    public IReadOnlyList<string>? StringList(string name)
    {
        if (!_json.TryGetPropertyValue(name, out var v) || v is null) return null;
        if (v is not JsonArray arr) throw new ConfigException($"config field '{name}' must be a list of strings, got {v.ToJsonString()}");
        return arr.Select(x => x is JsonValue jv && jv.TryGetValue<string>(out var s) ? s
            : throw new ConfigException($"config field '{name}' must be a list of strings")).ToList();
    }

    /// <summary>A list whose entries may be booleans or integers (Llama 4's <c>no_rope_layers</c>).</summary>
    public IReadOnlyList<bool>? TruthyList(string name)
    {
        if (!_json.TryGetPropertyValue(name, out var v) || v is null) return null;
        if (v is not JsonArray arr) throw new ConfigException($"config field '{name}' must be a list");
        return arr.Select(x => x switch
        {
            JsonValue jv when jv.TryGetValue<bool>(out var b) => b,
            JsonValue jv when JsonNumbers.TryDouble(jv, out var d) => d != 0,
            _ => throw new ConfigException($"config field '{name}' must hold booleans or integers"),
        }).ToList();
    }

    /// <summary>Reads a required positive integer and names the field when it is missing or not positive.</summary>
    public long Positive(string name, long @default)
    {
        var value = Int(name, @default);
        if (value <= 0) throw new ConfigException($"config field '{name}' must be a positive integer, got {value}");
        return value;
    }

    private static long ReadInt(string name, JsonNode v)
    {
        // transformers writes some integers as floats (e.g. 4096.0); accept exact integral values.
        if (JsonNumbers.TryLong(v, out var l)) return l;
        throw new ConfigException($"config field '{name}' must be an integer, got {v.ToJsonString()}");
    }
}

/// <summary>A config that cannot be analysed; the message is one line meant for the user.</summary>
public sealed class ConfigException(string message) : UserInputException(message);
