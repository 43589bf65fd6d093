using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>Decoder pieces shared by several families: the text-model body, MoE expert blocks and MLA attention.</summary>
internal static partial class Blocks
{
    /// <summary>
    /// The body of a text model under the current scope: embed_tokens, layers.{i} (class <c>{prefix}DecoderLayer</c>),
    /// norm, rotary_emb, then <paramref name="tail"/> (modules a model registers after its rotary embedding).
    /// </summary>
    public static void DecoderStack(TreeBuilder b, string prefix, long vocab, long hidden, long layers, Action<int> layer,
        string? normClass = null, bool rotary = true, bool layerNormFinal = false, Action? tail = null)
    {
        b.Embedding("embed_tokens", vocab, hidden);
        b.ModuleList("layers", layers, i =>
        {
            using (b.Scope(i.ToString(System.Globalization.CultureInfo.InvariantCulture), prefix + "DecoderLayer", ModuleLocation.Other, layer: i))
            {
                layer(i);
            }
        });
        if (layerNormFinal) b.LayerNorm("norm", hidden, location: ModuleLocation.Norm);
        else b.RmsNorm("norm", normClass ?? prefix + "RMSNorm", hidden, ModuleLocation.Norm);
        if (rotary) b.Leaf("rotary_emb", prefix + "RotaryEmbedding");
        tail?.Invoke();
    }

    /// <summary>How a checkpoint names one expert's three projections (gate, up, down).</summary>
    public sealed record ExpertNames(string Gate, string Up, string Down, bool MixtralOrder)
    {
        /// <summary>gate_proj / up_proj / down_proj, registered in that order.</summary>
        public static readonly ExpertNames Proj = new("gate_proj", "up_proj", "down_proj", false);

        /// <summary>Mixtral's w1 (gate), w3 (up), w2 (down), registered w1, w2, w3.</summary>
        public static readonly ExpertNames Mixtral = new("w1", "w3", "w2", true);
    }

    /// <summary>
    /// Routed experts as the layout has them: transformers 5's fused <c>experts</c> (gate_up_proj, down_proj), or the
    /// per-expert ModuleList that 4.57 built and that checkpoints store (<paramref name="names"/>).
    /// </summary>
    public static void Experts(TreeBuilder b, Layout layout, string prefix, long experts, long hidden, long intermediate,
        string actClass, ExpertNames names, string? expertClass = null, Action? v4Extra = null)
    {
        if (layout == Layout.V5)
        {
            FusedExperts(b, prefix + "Experts", experts, hidden, intermediate, actClass);
            return;
        }
        using (b.Scope("experts", prefix + "Experts", ModuleLocation.RoutedExpert))
        {
            v4Extra?.Invoke();
            for (var e = 0; e < experts; e++)
            {
                using (b.Scope(e.ToString(System.Globalization.CultureInfo.InvariantCulture), expertClass ?? prefix + "MLP"))
                {
                    b.Linear(names.Gate, hidden, intermediate);
                    if (names.MixtralOrder) b.Linear(names.Down, intermediate, hidden);
                    b.Linear(names.Up, hidden, intermediate);
                    if (!names.MixtralOrder) b.Linear(names.Down, intermediate, hidden);
                    b.Leaf("act_fn", actClass);
                }
            }
        }
    }

    /// <summary>The router as the layout has it: a transformers-5 TopK router module, or 4.57's nn.Linear gate.</summary>
    public static void Router(TreeBuilder b, Layout layout, string name, string className, long experts, long hidden)
    {
        if (layout == Layout.V5) TopKRouter(b, name, className, experts, hidden);
        else b.Linear(name, hidden, experts, location: ModuleLocation.Router);
    }

}
