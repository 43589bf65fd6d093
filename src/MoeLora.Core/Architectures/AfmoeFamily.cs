using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// AFMoE (<c>afmoe</c>, Arcee Trinity): gated attention (q/k RMSNorm per head, a sigmoid output gate
/// <c>self_attn.gate_proj</c>), sandwich norms around both attention and feed-forward, the first
/// <c>num_dense_layers</c> layers dense and the rest MoE. The MoE block registers router (a module holding the
/// <c>gate</c> nn.Linear, so PEFT can wrap it), shared_experts (<c>num_shared_experts</c> fused into one MLP), experts,
/// and the selection-only <c>expert_bias</c> (a frozen parameter, not a buffer). AFMoE did not exist in transformers
/// 4.57: <see cref="Layout.V4"/> means the on-disk checkpoint layout, per-expert
/// <c>experts.{e}.gate_proj/up_proj/down_proj</c> (a ModuleList of AfmoeMLP).
/// </summary>
internal sealed class AfmoeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["afmoe"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: AfmoeConfig (5.17).
        var vocab = c.Positive("vocab_size", 200192);
        var hidden = c.Positive("hidden_size", 2048);
        var inter = c.Positive("intermediate_size", 6144);
        var moeInter = c.Positive("moe_intermediate_size", 1408);
        var layers = c.Positive("num_hidden_layers", 32);
        var denseCount = c.Int("num_dense_layers", 1);
        var heads = c.Positive("num_attention_heads", 16);
        var kv = c.IntOrNull("num_key_value_heads", heads) ?? heads;
        var headDim = Blocks.HeadDim(c, hidden, heads, 128);
        var experts = c.Positive("num_experts", 64);
        var topK = c.Positive("num_experts_per_tok", 6);
        var shared = c.Int("num_shared_experts", 2);
        var attnBias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var sharedInter = moeInter * shared;

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers, i => i >= denseCount);
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder("AfmoeForCausalLM", layout);
        Blocks.CausalLm(b, "Afmoe", vocab, hidden, layers, tie, i =>
        {
            Blocks.Attention(b, "AfmoeAttention", hidden, heads, kv, headDim, attnBias, attnBias, afterProjections: bb =>
            {
                bb.RmsNorm("q_norm", "AfmoeRMSNorm", headDim);
                bb.RmsNorm("k_norm", "AfmoeRMSNorm", headDim);
                bb.Linear("gate_proj", hidden, heads * headDim);
            });
            b.RmsNorm("input_layernorm", "AfmoeRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "AfmoeRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("pre_mlp_layernorm", "AfmoeRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_mlp_layernorm", "AfmoeRMSNorm", hidden, ModuleLocation.Norm);
            if (!moeSet.Contains(i))
            {
                Blocks.GatedMlp(b, "mlp", "AfmoeMLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
                return;
            }
            using (b.Scope("mlp", "AfmoeSparseMoeBlock", ModuleLocation.Other))
            {
                b.Param("expert_bias", experts);
                using (b.Scope("router", "AfmoeTokenChoiceRouter", ModuleLocation.Router))
                    b.Linear("gate", hidden, experts);
                Blocks.GatedMlp(b, "shared_experts", "AfmoeMLP", hidden, sharedInter, false, actClass, ModuleLocation.SharedExpert);
                if (layout == Layout.V5) Blocks.FusedExperts(b, "AfmoeExperts", experts, hidden, moeInter, actClass);
                else Blocks.PerExpertMlps(b, "ModuleList", "AfmoeMLP", experts, hidden, moeInter, actClass);
            }
        });

        var routing = $"sigmoid scores + expert_bias (selection only), top-{topK} of {experts}, renormalised, " +
            $"scaled by {c.Double("route_scale", 1.0).ToString(System.Globalization.CultureInfo.InvariantCulture)}";
        var moe = new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers, routing);
        var spec = Blocks.Spec(c, "afmoe", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        // Sandwich norms (AfmoeRMSNorm multiplies by the weight in fp32); per-head q/k norms; a sigmoid output gate
        // (gate_proj) before o_proj; rope only on sliding layers (layer_types, default: every
        // global_attn_every_n_layers-th layer full); muP scales the embeddings by √hidden.
        var norm = new NormSettings(NormKind.RmsWeightInFp32, c.Double("rms_norm_eps", 1e-5));
        var every = c.Positive("global_attn_every_n_layers", 4);
        var layerTypes = c.StringList("layer_types")
            ?? Enumerable.Range(0, (int)layers).Select(i => (i + 1) % every != 0 ? "sliding_attention" : "full_attention").ToList();
        if (layerTypes.Count < layers)
            throw new ConfigException($"config field 'layer_types' has {layerTypes.Count} entries but num_hidden_layers is {layers}");
        var form = new LayerForm(["self_attn", "input_layernorm", "post_attention_layernorm", "pre_mlp_layernorm", "post_mlp_layernorm", "mlp"],
            new NamedNorm("input_layernorm", norm), new NamedNorm("post_attention_layernorm", norm),
            new NamedNorm("pre_mlp_layernorm", norm), new NamedNorm("post_mlp_layernorm", norm));
        var moeFf = new MoeSettings(
            new SigmoidBiasRouterSettings("router.gate", experts, topK, new ScoreBias("expert_bias", ScoreBiasOwner.Block, IsParameter: true),
                NormTopK: true, NormEps: 1e-20, Scale: c.Double("route_scale", 1.0), SoftCap: 0, LinearModule: true),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
            new SharedExpertSettings("shared_experts", sharedInter, act, null), MoeOrder.RouterFirst, new MoeOptions(SharedFirst: true));
        var all = new List<DecoderLayerRuntime>();
        for (int i = 0; i < layers; i++)
        {
            var sliding = layerTypes[i] == "sliding_attention";
            var mask = sliding ? new MaskSettings(MaskKind.Sliding, c.Positive("sliding_window", 1024)) : MaskSettings.Full;
            var attn = new StandardAttentionSettings(heads, kv, headDim, attnBias, attnBias, QkNormKind.PerHead, norm.Eps, Sinks: false, mask, headDim,
                new StandardAttentionOptions(Rotary: sliding ? RotaryStyle.Half : RotaryStyle.None, Gate: new OutputGate("gate_proj", OutputGateKind.Sigmoid, PerHead: false)));
            FeedForwardSettings ff = moeSet.Contains(i) ? moeFf : new GatedMlpSettings(inter, act);
            all.Add(new DecoderLayerRuntime(attn, "mlp", ff, norm, norm, form));
        }
        var scaling = new ModelScaling(EmbeddingMultiplier: c.Bool("mup_enabled", false) ? Math.Sqrt(hidden) : 1.0);
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, RopeSettings.Read(c, 10000.0, headDim), all, Scaling: scaling),
        };
    }
}
