using MoeLora.Core.Config;

namespace MoeLora.Core.Architectures.Runtime;

/// <summary>
/// The rotary table transformers computes from <c>rope_parameters</c> (5.x) or <c>rope_scaling</c> + <c>rope_theta</c>
/// (older config.json files): inverse frequencies over <paramref name="Dim"/> dims for <paramref name="Type"/>
/// default, linear, llama3, yarn, longrope or dynamic. Optional fields are null when the config does not give them.
/// longrope and dynamic pick their table per forward from the sequence length, so they also need the model's
/// <paramref name="MaxPositionEmbeddings"/>. <paramref name="PhimoeRotary"/> is transformers 5.17's own
/// <c>PhimoeRotaryEmbedding</c>: <c>short_mscale</c> / <c>long_mscale</c> (by sequence length) replace the attention
/// factor, and its forward calls the longrope init without a sequence length, so the table is the short factors' at
/// every length (Phi-3.5-MoE's original code and transformers 4.x switched to the long factors; 5.17 does not, and
/// MoeLora follows what transformers runs).
/// </summary>
public sealed record RopeSettings(
    string Type,
    double Theta,
    long Dim,
    double? Factor = null,
    long? OriginalMaxPositionEmbeddings = null,
    double? AttentionFactor = null,
    double? BetaFast = null,
    double? BetaSlow = null,
    double? MScale = null,
    double? MScaleAllDim = null,
    bool Truncate = true,
    double? LowFreqFactor = null,
    double? HighFreqFactor = null,
    IReadOnlyList<double>? ShortFactor = null,
    IReadOnlyList<double>? LongFactor = null,
    double? ShortMScale = null,
    double? LongMScale = null,
    long? MaxPositionEmbeddings = null,
    bool PhimoeRotary = false)
{
    /// <summary>
    /// Reads the rope of a (text) config. <paramref name="defaultTheta"/> is the config class' <c>default_theta</c>;
    /// <paramref name="dim"/> the rotated dims per head (already multiplied by any partial rotary factor).
    /// </summary>
    public static RopeSettings Read(ModelConfig c, double defaultTheta, long dim)
    {
        var o = c.Sub("rope_parameters") ?? c.Sub("rope_scaling");
        var rope = Of(o, o?.Double("rope_theta", c.Double("rope_theta", defaultTheta)) ?? c.Double("rope_theta", defaultTheta), dim);
        var max = c.IntOrNull("max_position_embeddings", null);
        // transformers 5's standardize_rope_params, for the types that read the pretraining length: a top-level
        // original_max_position_embeddings (Phi-3-style configs) wins over rope_parameters' own; without either, the
        // length is max_position_embeddings.
        var original = rope.Type is "llama3" or "yarn" or "longrope"
            ? c.IntOrNull("original_max_position_embeddings", null) ?? rope.OriginalMaxPositionEmbeddings ?? max
            : rope.OriginalMaxPositionEmbeddings;
        return rope with { MaxPositionEmbeddings = max, OriginalMaxPositionEmbeddings = original };
    }

    /// <summary>
    /// The rope one <c>rope_parameters</c> object describes (its type, default "default", and scaling fields), with base
    /// <paramref name="theta"/>; null <paramref name="o"/>: the default rope.
    /// </summary>
    public static RopeSettings Of(ModelConfig? o, double theta, long dim)
    {
        string type = o?.String("rope_type") ?? o?.String("type") ?? "default";
        double? D(string k) => o is not null && o.Has(k) ? o.Double(k, 0) : null;
        long? L(string k) => o is not null && o.Has(k) ? (long)o.Double(k, 0) : null;
        return new RopeSettings(type, theta, dim, D("factor"), L("original_max_position_embeddings"), D("attention_factor"),
            D("beta_fast"), D("beta_slow"), D("mscale"), D("mscale_all_dim"), o?.Bool("truncate", true) ?? true,
            D("low_freq_factor"), D("high_freq_factor"), o?.DoubleList("short_factor"), o?.DoubleList("long_factor"),
            D("short_mscale"), D("long_mscale"));
    }

    /// <summary>
    /// <c>partial_rotary_factor</c> as the rotary embedding reads it: from <c>rope_parameters</c>, else the top-level
    /// field, else <paramref name="classDefault"/>.
    /// </summary>
    public static double PartialRotaryFactor(ModelConfig c, double classDefault)
    {
        var o = c.Sub("rope_parameters");
        return o is not null && o.Has("partial_rotary_factor") ? o.Double("partial_rotary_factor", classDefault)
            : c.Double("partial_rotary_factor", classDefault);
    }

    /// <summary>
    /// The softmax scale of DeepSeek-V3-style MLA (<c>yarn_apply_mscale</c>): <paramref name="qkHeadDim"/>^-0.5, times
    /// mscale² when this rope is not the default one and gives a non-zero <c>mscale_all_dim</c>.
    /// </summary>
    public double MlaSoftmaxScale(long qkHeadDim)
    {
        var scaling = Math.Pow(qkHeadDim, -0.5);
        if (Type != "default" && MScaleAllDim is { } mad && mad != 0 && Factor is { } f)
            scaling *= Math.Pow(YarnMScale(f, mad), 2);
        return scaling;
    }

    /// <summary>yarn's mscale: 1 for scale ≤ 1, else 0.1·m·ln(scale) + 1.</summary>
    public static double YarnMScale(double scale, double m = 1) => scale <= 1 ? 1.0 : 0.1 * m * Math.Log(scale) + 1.0;
}
