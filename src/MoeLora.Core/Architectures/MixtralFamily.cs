using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Mixtral: every layer MoE, experts named w1 (gate), w2 (down), w3 (up) in v4 under <c>block_sparse_moe</c>;
/// transformers 5 renames the block to <c>mlp</c> and fuses the experts.
/// </summary>
internal sealed class MixtralFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["mixtral"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var vocab = c.Positive("vocab_size", 32000);
        var hidden = c.Positive("hidden_size", 4096);
        var inter = c.Positive("intermediate_size", 14336);
        var layers = c.Positive("num_hidden_layers", 32);
        var heads = c.Positive("num_attention_heads", 32);
        var kv = c.IntOrNull("num_key_value_heads", 8) ?? heads;
        var headDim = Blocks.HeadDim(c, hidden, heads);
        var experts = c.Positive("num_local_experts", 8);
        var topK = c.Positive("num_experts_per_tok", 2);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        var b = new TreeBuilder("MixtralForCausalLM", layout);
        Blocks.CausalLm(b, "Mixtral", vocab, hidden, layers, tie, _ =>
        {
            Blocks.Attention(b, "MixtralAttention", hidden, heads, kv, headDim, false, false);
            if (layout == Layout.V5)
            {
                using (b.Scope("mlp", "MixtralSparseMoeBlock", ModuleLocation.Other))
                {
                    Blocks.TopKRouter(b, "gate", "MixtralTopKRouter", experts, hidden);
                    Blocks.FusedExperts(b, "MixtralExperts", experts, hidden, inter, actClass);
                }
            }
            else
            {
                using (b.Scope("block_sparse_moe", "MixtralSparseMoeBlock", ModuleLocation.Other))
                {
                    b.Linear("gate", hidden, experts, location: ModuleLocation.Router);
                    Blocks.PerExpertMlps(b, "MixtralExperts", "MixtralBlockSparseTop2MLP", experts, hidden, inter, actClass,
                        gate: "w1", up: "w3", down: "w2", mixtralOrder: true);
                }
            }
            b.RmsNorm("input_layernorm", "MixtralRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "MixtralRMSNorm", hidden, ModuleLocation.Norm);
        });
        var all = Enumerable.Range(0, (int)layers).ToList();
        var moe = new MoeFacts(experts, topK, 0, inter, 0, all, [], $"softmax over {experts} experts, top-{topK}, renormalised");
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-5));
        var window = c.IntOrNull("sliding_window", null) ?? 0;
        var layer = new DecoderLayerRuntime(
            new StandardAttentionSettings(heads, kv, headDim, false, false, QkNormKind.None, norm.Eps, Sinks: false,
                window > 0 ? new MaskSettings(MaskKind.Sliding, window) : MaskSettings.Full, RotaryDim: headDim),
            "mlp",
            new MoeSettings(new SoftmaxTopKRouterSettings("gate", experts, topK, NormTopK: true),
                new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, inter, act), Shared: null, MoeOrder.RouterFirst),
            norm, norm);
        return Blocks.Spec(c, "mixtral", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm,
                RopeSettings.Read(c, 1000000.0, headDim), Enumerable.Repeat(layer, (int)layers).ToList()),
        };
    }
}
