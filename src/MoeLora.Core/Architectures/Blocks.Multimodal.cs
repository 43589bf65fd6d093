using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>Pieces of the image-text-to-text models whose <c>model</c> holds a vision tower and a language model.</summary>
internal static partial class Blocks
{
    /// <summary>
    /// A decoder stack under the current scope: <paramref name="name"/> (embed_tokens, layers.{i}, norm, rotary_emb, then
    /// whatever <paramref name="after"/> adds), without the lm_head, which callers register themselves.
    /// </summary>
    public static void DecoderStack(TreeBuilder b, string name, string modelClass, string layerClass, string normClass,
        string rotaryClass, long vocab, long hidden, long layers, Action<int> layer, Action? after = null)
    {
        using (b.Scope(name, modelClass))
        {
            b.Embedding("embed_tokens", vocab, hidden);
            b.ModuleList("layers", layers, i =>
            {
                using (b.Scope(i.ToString(System.Globalization.CultureInfo.InvariantCulture), layerClass, ModuleLocation.Other, layer: i))
                    layer(i);
            });
            b.RmsNorm("norm", normClass, hidden, ModuleLocation.Norm);
            b.Leaf("rotary_emb", rotaryClass);
            after?.Invoke();
        }
    }

    /// <summary>
    /// An nn.Conv1d/2d/3d: weight [out, in, *kernel] (+ bias [out]). all-linear collects only Linear names, but PEFT
    /// wraps a conv that shares one (GLM-4V's patch_embed.proj matches the Linear name "proj").
    /// </summary>
    public static void Conv(TreeBuilder b, string name, string className, long inChannels, long outChannels, bool bias,
        params long[] kernel)
    {
        var node = b.Add(name, className, ModuleKind.Conv, inFeatures: inChannels, outFeatures: outChannels);
        node.Parameters.Add(new ParameterNode(node.Name + ".weight", "weight", [outChannels, inChannels, .. kernel], null));
        if (bias) node.Parameters.Add(new ParameterNode(node.Name + ".bias", "bias", [outChannels], null));
    }

    /// <summary>
    /// SigLIP/CLIP-style encoder attention under <paramref name="name"/>: k_proj, v_proj, q_proj, out_proj, each
    /// width → width with a bias, registered in that order.
    /// </summary>
    public static void VisionSelfAttention(TreeBuilder b, string name, string className, long width)
    {
        using (b.Scope(name, className))
        {
            b.Linear("k_proj", width, width, true);
            b.Linear("v_proj", width, width, true);
            b.Linear("q_proj", width, width, true);
            b.Linear("out_proj", width, width, true);
        }
    }

    /// <summary>
    /// Copies the modules of <paramref name="source"/> at and under <paramref name="sourcePrefix"/> (e.g. a causal LM's
    /// <c>model</c>, which is what AutoModel builds for a text_config) under the current scope as
    /// <paramref name="localName"/>, with classes, kinds, locations, parameters and buffers; <paramref name="rename"/>
    /// rewrites each new local name (a checkpoint layout's own renames).
    /// </summary>
    public static void Graft(TreeBuilder b, ModuleTree source, string sourcePrefix, string localName, Func<string, string>? rename = null)
    {
        foreach (var m in source.Modules.Where(m => m.Name == sourcePrefix || m.Name.StartsWith(sourcePrefix + ".", StringComparison.Ordinal)))
        {
            var local = localName + m.Name[sourcePrefix.Length..];
            var node = b.Add(rename?.Invoke(local) ?? local, m.ClassName, m.Kind, m.Location, m.LayerIndex, m.InFeatures, m.OutFeatures,
                m.IsTransposed, m.NumExperts);
            node.Parameters.AddRange(m.Parameters.Select(p => new ParameterNode(node.Name + "." + p.LocalName, p.LocalName, p.Shape, null)));
            node.Buffers.AddRange(m.Buffers.Select(p => new ParameterNode(node.Name + "." + p.LocalName, p.LocalName, p.Shape, null)));
        }
    }

    /// <summary>The spec of an image-text-to-text model whose language model sits at <c>model.language_model</c>.</summary>
    public static ModelSpec MultimodalSpec(ModelConfig config, ModelConfig text, string modelType, ModuleTree tree, MoeFacts moe,
        long hidden, long layers, long vocab, long heads, long kvHeads, bool tie, string act) =>
        Spec(config, modelType, tree, moe, hidden, layers, vocab, heads, kvHeads, tie, act) with
        {
            TextConfig = text,
            DecoderLayersPath = "model.language_model.layers",
            InputEmbeddings = "model.language_model.embed_tokens",
        };
}
