using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Sources.Analysis;

/// <summary>
/// Wraps a <see cref="DerivedModel"/> as a <see cref="ModelSpec"/> so PEFT planning and the report run on it. Sizes the
/// config states win; the rest is read from the tensors. The architecture name carries the "derived" label.
/// </summary>
public static class DerivedSpec
{
    public static ModelSpec From(DerivedModel derived, ModelConfig config)
    {
        var tree = derived.Tree;
        var embedding = tree.Modules.FirstOrDefault(m => m.Kind == ModuleKind.Embedding);
        var head = tree.Modules.FirstOrDefault(m => m.Location == ModuleLocation.LmHead);
        var hidden = config.IntOrNull("hidden_size", null) ?? embedding?.OutFeatures ?? 0;
        var vocab = config.IntOrNull("vocab_size", null) ?? embedding?.InFeatures ?? 0;
        var heads = config.IntOrNull("num_attention_heads", null) ?? 0;
        var layersPath = tree.Modules.FirstOrDefault(m => m.LeafName == "layers")?.Name ?? "model.layers";
        var moeSet = derived.MoeLayers.ToHashSet();
        var moe = new MoeFacts(
            derived.NumExperts,
            config.IntOrNull("num_experts_per_tok", null) ?? 0,
            tree.Modules.Any(m => m.Location == ModuleLocation.SharedExpert) ? 1 : 0,
            0, 0, derived.MoeLayers,
            Enumerable.Range(0, derived.NumLayers).Where(i => !moeSet.Contains(i)).ToList(),
            "unknown (derived from checkpoint headers)");
        return new ModelSpec
        {
            ModelType = derived.ModelType ?? "unknown",
            Architecture = tree.Root.ClassName,
            DerivedLabel = DerivedModel.Label,
            Config = config,
            TextConfig = config,
            Tree = tree,
            Moe = moe,
            HiddenSize = hidden,
            NumHiddenLayers = derived.NumLayers,
            VocabSize = vocab,
            NumAttentionHeads = heads,
            NumKeyValueHeads = config.IntOrNull("num_key_value_heads", null) ?? heads,
            DecoderLayersPath = layersPath,
            InputEmbeddings = embedding?.Name ?? "",
            OutputEmbeddings = head?.Name ?? "",
            TieWordEmbeddings = head is null,
            HiddenAct = config.String("hidden_act", "silu")!,
        };
    }
}
