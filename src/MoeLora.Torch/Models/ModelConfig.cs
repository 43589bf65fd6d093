using System.Text.Json.Nodes;

namespace MoeLora.Torch.Models;

/// <summary>
/// Read-only view of a transformers config.json. Accessors apply the config classes' defaults (transformers 5.17)
/// where a field is absent, and fail with the field name where a required one is missing.
/// </summary>
public sealed class ModelConfig
{
    readonly JsonObject _json;
    public ModelConfig(JsonObject json) => _json = json;

    public static ModelConfig Parse(string json) =>
        new(JsonNode.Parse(json)?.AsObject() ?? throw new InvalidDataException("config.json is empty."));

    /// <summary>The config.json text (e.g. for Core's ModelSpec / AdapterPlan).</summary>
    public string ToJson() => _json.ToJsonString();

    public string ModelType => Str("model_type");
    public long HiddenSize => Long("hidden_size");
    public long VocabSize => Long("vocab_size");
    public long NumLayers => Long("num_hidden_layers");
    public long NumHeads => Long("num_attention_heads");
    public long NumKvHeads => LongOr("num_key_value_heads", NumHeads);
    public double RmsEps => DoubleOr("rms_norm_eps", 1e-6);
    public string HiddenAct => StrOr("hidden_act", "silu");
    public double InitializerRange => DoubleOr("initializer_range", 0.02);
    public bool TieWordEmbeddings => BoolOr("tie_word_embeddings", false);

    /// <summary>head_dim if present and non-null, else hidden/heads (the rule for every non-DeepSeek model).</summary>
    public long HeadDim => Has("head_dim") ? Long("head_dim") : HiddenSize / NumHeads;

    public RopeParameters RopeParameters
    {
        get
        {
            var o = (_json["rope_parameters"] ?? _json["rope_scaling"]) as JsonObject;
            double theta = o?["rope_theta"]?.GetValue<double>() ?? DoubleOr("rope_theta", 10000.0);
            string type = o?["rope_type"]?.GetValue<string>() ?? o?["type"]?.GetValue<string>() ?? "default";
            double? D(string k) => o?[k] is JsonValue v ? v.GetValue<double>() : null;
            long? L(string k) => o?[k] is JsonValue v ? (long)v.GetValue<double>() : null;
            bool truncate = o?["truncate"] is JsonValue t ? t.GetValue<bool>() : true;
            return new RopeParameters(type, theta, D("factor"), L("original_max_position_embeddings"), D("attention_factor"),
                D("beta_fast"), D("beta_slow"), D("mscale"), D("mscale_all_dim"), truncate, D("low_freq_factor"), D("high_freq_factor"));
        }
    }

    public bool Has(string key) => _json[key] is not null;
    public string Str(string key) => _json[key]?.GetValue<string>() ?? throw Missing(key);
    public string StrOr(string key, string d) => _json[key]?.GetValue<string>() ?? d;
    public long Long(string key) => _json[key] is JsonValue v ? (long)v.GetValue<double>() : throw Missing(key);
    public long LongOr(string key, long d) => _json[key] is JsonValue v ? (long)v.GetValue<double>() : d;
    public long? LongOrNull(string key) => _json[key] is JsonValue v ? (long)v.GetValue<double>() : null;
    public double DoubleOr(string key, double d) => _json[key] is JsonValue v ? v.GetValue<double>() : d;
    public bool BoolOr(string key, bool d) => _json[key] is JsonValue v ? v.GetValue<bool>() : d;
    public long[] LongArrayOr(string key, long[] d) =>
        _json[key] is JsonArray a ? a.Select(x => (long)x!.GetValue<double>()).ToArray() : d;
    public string[]? StrArray(string key) => _json[key] is JsonArray a ? a.Select(x => x!.GetValue<string>()).ToArray() : null;

    InvalidDataException Missing(string key) => new($"config.json ({StrOr("model_type", "?")}): required field '{key}' is missing.");
}

public sealed record RopeParameters(string Type, double Theta, double? Factor, long? OriginalMaxPositionEmbeddings,
    double? AttentionFactor, double? BetaFast, double? BetaSlow, double? MScale, double? MScaleAllDim, bool Truncate,
    double? LowFreqFactor = null, double? HighFreqFactor = null);
