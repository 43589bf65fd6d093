using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Dense Llama-style decoders: llama, mistral, qwen2, qwen3 (identical in transformers 4.46-4.57 and 5.x).
/// Defaults are the transformers config classes' own.
/// </summary>
internal sealed class LlamaFamily : IArchitecture
{
    private sealed record Variant(string Prefix, long Vocab, long Hidden, long Intermediate, long Layers, long Heads,
        long? KvHeads, long? HeadDimDefault, bool QkNorm);

    private static readonly Dictionary<string, Variant> Variants = new()
    {
        ["llama"] = new("Llama", 32000, 4096, 11008, 32, 32, null, null, false),
        ["mistral"] = new("Mistral", 32000, 4096, 14336, 32, 32, 8, null, false),
        ["qwen2"] = new("Qwen2", 151936, 4096, 22016, 32, 32, 32, null, false),
        ["qwen3"] = new("Qwen3", 151936, 4096, 22016, 32, 32, 32, 128, true),
    };

    public IReadOnlyList<string> ModelTypes => Variants.Keys.ToList();

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var type = c.ModelType!;
        var v = Variants[type];
        var vocab = c.Positive("vocab_size", v.Vocab);
        var hidden = c.Positive("hidden_size", v.Hidden);
        var inter = c.Positive("intermediate_size", v.Intermediate);
        var layers = c.Positive("num_hidden_layers", v.Layers);
        var heads = c.Positive("num_attention_heads", v.Heads);
        var kv = c.IntOrNull("num_key_value_heads", v.KvHeads) ?? heads;
        var headDim = Blocks.HeadDim(c, hidden, heads, v.HeadDimDefault);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        // qwen2 hard-codes q/k/v bias and no o bias; the others read attention_bias (default False).
        var attnBias = type != "qwen2" && c.Bool("attention_bias", false);
        var qkvBias = type == "qwen2" || attnBias;
        var mlpBias = type == "llama" && c.Bool("mlp_bias", false);

        var b = new TreeBuilder(v.Prefix + "ForCausalLM", layout);
        Blocks.CausalLm(b, v.Prefix, vocab, hidden, layers, tie, _ =>
        {
            Blocks.Attention(b, v.Prefix + "Attention", hidden, heads, kv, headDim, qkvBias, attnBias, afterProjections: v.QkNorm
                ? bb =>
                {
                    bb.RmsNorm("q_norm", v.Prefix + "RMSNorm", headDim);
                    bb.RmsNorm("k_norm", v.Prefix + "RMSNorm", headDim);
                }
                : null);
            Blocks.GatedMlp(b, "mlp", v.Prefix + "MLP", hidden, inter, mlpBias, actClass, ModuleLocation.Mlp);
            b.RmsNorm("input_layernorm", v.Prefix + "RMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", v.Prefix + "RMSNorm", hidden, ModuleLocation.Norm);
        });
        var spec = Blocks.Spec(c, type, b.Build(), MoeFacts.Dense(layers), hidden, layers, vocab, heads, kv, tie, act);

        // Runtime: Qwen's use_sliding_window applies windows per layer (max_window_layers), which the runtime lacks.
        if ((type is "qwen2" or "qwen3") && c.Bool("use_sliding_window", false))
            return spec with { RuntimeUnavailable = "use_sliding_window=true (Qwen's per-layer sliding windows)" };
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6));
        // Mistral attends within sliding_window tokens when the config sets one (7B v0.1), else to the whole past.
        var window = type == "mistral" ? c.IntOrNull("sliding_window", null) : null;
        var attention = new StandardAttentionSettings(heads, kv, headDim, qkvBias, attnBias,
            v.QkNorm ? QkNormKind.PerHead : QkNormKind.None, norm.Eps, Sinks: false,
            window is long w ? new MaskSettings(MaskKind.Sliding, w) : MaskSettings.Full, RotaryDim: headDim);
        var layer = new DecoderLayerRuntime(attention, "mlp", new GatedMlpSettings(inter, act, mlpBias), norm, norm);
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm,
                RopeSettings.Read(c, 10000.0, headDim), Enumerable.Repeat(layer, (int)layers).ToList()),
        };
    }
}
