using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>Mixture-of-Experts facts read from the config, as the modeling code interprets them.</summary>
/// <param name="NumExperts">Routed experts per MoE layer (0 for dense models).</param>
/// <param name="ExpertsPerToken">Top-k routing.</param>
/// <param name="SharedExperts">Shared experts per MoE layer, as the config counts them (0 when none).</param>
/// <param name="ExpertIntermediateSize">Intermediate size of one routed expert.</param>
/// <param name="SharedExpertIntermediateSize">Intermediate size of the shared expert MLP (0 when none).</param>
/// <param name="MoeLayers">Decoder layers whose feed-forward block is MoE.</param>
/// <param name="DenseLayers">Decoder layers with a dense MLP.</param>
/// <param name="Routing">How tokens are routed, in words.</param>
public sealed record MoeFacts(
    long NumExperts,
    long ExpertsPerToken,
    long SharedExperts,
    long ExpertIntermediateSize,
    long SharedExpertIntermediateSize,
    IReadOnlyList<int> MoeLayers,
    IReadOnlyList<int> DenseLayers,
    string Routing)
{
    public bool IsMoe => NumExperts > 0 && MoeLayers.Count > 0;

    public static MoeFacts Dense(long layers) =>
        new(0, 0, 0, 0, 0, [], Enumerable.Range(0, (int)layers).ToList(), "none (dense)");
}

/// <summary>Everything the analysis knows about one model: its config, the built tree and its MoE facts.</summary>
public sealed record ModelSpec
{
    public required string ModelType { get; init; }

    /// <summary>The transformers class that was built (the root of the tree).</summary>
    public required string Architecture { get; init; }

    public required ModelConfig Config { get; init; }

    /// <summary>The language model's config (<c>text_config</c> for multimodal models, else the config itself).</summary>
    public required ModelConfig TextConfig { get; init; }

    public required ModuleTree Tree { get; init; }

    public required MoeFacts Moe { get; init; }

    public required long HiddenSize { get; init; }

    public required long NumHiddenLayers { get; init; }

    public required long VocabSize { get; init; }

    public required long NumAttentionHeads { get; init; }

    public required long NumKeyValueHeads { get; init; }

    /// <summary>Dotted path of the decoder layers' ModuleList, e.g. <c>model.layers</c>.</summary>
    public required string DecoderLayersPath { get; init; }

    /// <summary>Input embedding module name, e.g. <c>model.embed_tokens</c>.</summary>
    public required string InputEmbeddings { get; init; }

    /// <summary>Output embedding module name (<c>lm_head</c>), which PEFT's all-linear never targets.</summary>
    public required string OutputEmbeddings { get; init; }

    public required bool TieWordEmbeddings { get; init; }

    /// <summary>Activation name of the MLPs (<c>hidden_act</c>).</summary>
    public string HiddenAct { get; init; } = "silu";

    public Layout Layout => Tree.Layout;

    /// <summary>Set when the tree was derived from checkpoint headers (unknown model_type): names are the checkpoint's.</summary>
    public string? DerivedLabel { get; init; }

    /// <summary>
    /// The transformers-5 decoder as typed settings, read from the same config fields (and defaults) as the tree: the
    /// runtime builds from it, and its parameters equal the <see cref="Layout.V5"/> tree. Null when the runtime cannot
    /// build this model; <see cref="RuntimeUnavailable"/> then says why.
    /// </summary>
    public DecoderRuntime? Runtime { get; init; }

    /// <summary>Why <see cref="Runtime"/> is null, in a few words naming what is missing (e.g. MiniMax's lightning-attention layers).</summary>
    public string? RuntimeUnavailable { get; init; }

    /// <summary>
    /// The checkpoint layout stores each gate and up projection pair as one tensor whose rows alternate gate, up, gate,
    /// up (transformers converts it with <c>Interleave</c>: Inkling's multimodal checkpoints' <c>w13</c> tensors), so
    /// <see cref="Modules.CheckpointLayout"/> maps the runtime's gate / up / gate_up_proj tensors to its even and odd rows.
    /// </summary>
    public bool CheckpointGateUpInterleaved { get; init; }

    /// <summary>
    /// The checkpoint layout stores router weights transposed, [H, E] for the runtime's [E, H] (transformers converts
    /// them with <c>Transpose(0, 1)</c>: ERNIE 4.5 VL's <c>gate.weight</c> and <c>gate.weight_1</c>), so
    /// <see cref="Modules.CheckpointLayout"/> pairs each runtime router weight with the stored tensor of its layer and
    /// router class whose shape is its transpose, in registration order. Declared rather than guessed: an [E, H] weight
    /// with E == H would look like a plain rename.
    /// </summary>
    public bool CheckpointRoutersTransposed { get; init; }

    /// <summary>
    /// Set when transformers builds this config but its forward fails (what fails, in a sentence or two): the analysis
    /// still describes the model it builds, and reports warn (Doge with is_moe in transformers 5.17).
    /// </summary>
    public string? TransformersForwardFails { get; init; }

    /// <summary>
    /// Set for a family whose tree is read from transformers' modeling source but not yet compared with what
    /// transformers 5.17 builds (no oracle data for it): where the tree came from, in a few words. Reports warn
    /// (<c>tree_unchecked</c>); the oracle tests require it exactly for the supported types without oracle data.
    /// </summary>
    public string? Unchecked { get; init; }

    /// <summary>
    /// Heads of the rope permutation transformers applies to the q and k rows it chunks out of a stored fused
    /// <c>in_proj_weight</c> / <c>in_proj_bias</c> when loading (<c>PermuteForRope</c> after <c>Chunk(dim=0)</c>: Step-3.7's
    /// vision tower); <see cref="CheckpointLayout"/> records it on those chunks. Null: no such permutation.
    /// </summary>
    public long? InProjRopeHeads { get; init; }

    /// <summary>The runtime description, or a one-line refusal naming what the runtime lacks.</summary>
    public DecoderRuntime RequireRuntime() => Runtime
        ?? throw new NotSupportedException($"model_type '{ModelType}' cannot run in MoeLora's runtime: {RuntimeUnavailable ?? "no runtime description"}.");
}
