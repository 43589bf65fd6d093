using System.Text.Json.Nodes;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>Building blocks for choosing a model's head class and for nesting a language model in a multimodal one.</summary>
internal static partial class Blocks
{
    /// <summary>
    /// The class a config builds, as loading a checkpoint does: the class <c>config.architectures[0]</c> names when the
    /// family builds it; otherwise what <c>AutoModelForCausalLM</c> builds for the type (<paramref name="causalLm"/>,
    /// null when the type has no causal-LM mapping), else the image-text-to-text class.
    /// </summary>
    public static string HeadClass(ModelConfig c, string? causalLm, string? imageTextToText)
    {
        var named = c.StringList("architectures") is [var first, ..] ? first : null;
        if (named is not null && (named == causalLm || named == imageTextToText)) return named;
        return causalLm ?? imageTextToText
            ?? throw new ArgumentException("a family must name at least one head class", nameof(causalLm));
    }

    /// <summary>A nested config (<c>text_config</c>, <c>vision_config</c>); an absent or null one is all defaults.</summary>
    public static ModelConfig SubOrDefaults(ModelConfig c, string name) => c.Sub(name) ?? new ModelConfig(new JsonObject(), c);

    /// <summary>
    /// A decoder-only text model scope: <c>{attr}.embed_tokens</c>, <c>{attr}.layers.{i}</c>, <c>{attr}.norm</c>,
    /// <c>{attr}.rotary_emb</c> (no lm_head, so that multimodal models can register it at their root).
    /// <paramref name="normClass"/> null: the model has no final norm (Qwen4-Exp); <paramref name="tail"/> registers
    /// what the model adds after its rotary embedding (Qwen4-Exp's hyper-connection mixer).
    /// </summary>
    public static void TextModel(TreeBuilder b, string attr, string modelClass, string layerClass, long vocab, long hidden,
        long layers, Action<int> layer, string? normClass, string? rotaryClass, string embedName = "embed_tokens",
        string normName = "norm", Action? tail = null)
    {
        using (b.Scope(attr, modelClass))
        {
            b.Embedding(embedName, vocab, hidden);
            b.ModuleList("layers", layers, i =>
            {
                using (b.Scope(i.ToString(System.Globalization.CultureInfo.InvariantCulture), layerClass, ModuleLocation.Other, layer: i))
                    layer(i);
            });
            if (normClass is not null) b.RmsNorm(normName, normClass, hidden, ModuleLocation.Norm);
            if (rotaryClass is not null) b.Leaf("rotary_emb", rotaryClass);
            tail?.Invoke();
        }
    }

    /// <summary>The root <c>lm_head</c>, tied to <paramref name="embedding"/> when <paramref name="tie"/>.</summary>
    public static void LmHead(TreeBuilder b, long hidden, long vocab, bool tie, string embedding, string name = "lm_head") =>
        b.Linear(name, hidden, vocab, location: ModuleLocation.LmHead, tiedWeightTo: tie ? embedding + ".weight" : null);

    /// <summary>A spec whose language model sits under <paramref name="textModel"/> (e.g. <c>model.language_model</c>).</summary>
    public static ModelSpec NestedSpec(ModelConfig config, ModelConfig text, string modelType, ModuleTree tree, MoeFacts moe,
        long hidden, long layers, long vocab, long heads, long kvHeads, bool tie, string act, string textModel,
        string lmHead = "lm_head", string embedName = "embed_tokens") =>
        Spec(config, modelType, tree, moe, hidden, layers, vocab, heads, kvHeads, tie, act) with
        {
            TextConfig = text,
            DecoderLayersPath = textModel + ".layers",
            InputEmbeddings = textModel + "." + embedName,
            OutputEmbeddings = lmHead,
        };
}
