using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Cohere2-MoE (<c>cohere2_moe</c>, new in transformers 5: Layout.V4 means the on-disk checkpoint layout, v5 module
/// classes with the experts as a per-expert ModuleList of gate_proj/up_proj/down_proj). Cohere's parallel block: one
/// <c>input_layernorm</c> feeds attention and MLP, so there is no post-attention norm. Norms are weight-only
/// Cohere2MoeLayerNorms unless <c>rms_norm_eps</c> is set (then Cohere2MoeRMSNorms).
/// <para>
/// <c>mlp_layer_types</c> (default: the first <c>first_k_dense_replace</c> layers dense, an init-only argument that
/// to_dict does not keep) picks a dense MLP of <c>prefix_dense_intermediate_size</c> (default
/// <c>intermediate_size</c>) or the MoE block: router, experts of <c>intermediate_size</c>, and, when
/// <c>num_shared_experts</c> &gt; 0, one shared MLP of <c>intermediate_size · num_shared_experts</c>.
/// </para>
/// </summary>
internal sealed class Cohere2MoeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["cohere2_moe"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        const string p = "Cohere2Moe";
        // Defaults: Cohere2MoeConfig.
        var vocab = c.Positive("vocab_size", 256000);
        var hidden = c.Positive("hidden_size", 8192);
        var inter = c.Positive("intermediate_size", 22528);
        var denseInter = c.IntOrNull("prefix_dense_intermediate_size", null) ?? inter;
        var layers = c.Positive("num_hidden_layers", 40);
        var heads = c.Positive("num_attention_heads", 64);
        var kv = c.IntOrNull("num_key_value_heads", null) ?? heads;
        var headDim = c.Positive("head_dim", 128);
        var experts = c.Positive("num_experts", 8);
        var topK = c.Positive("num_experts_per_tok", 2);
        var shared = c.Int("num_shared_experts", 0);
        var bias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", true);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var normClass = c.Has("rms_norm_eps") ? p + "RMSNorm" : p + "LayerNorm";
        var firstDense = c.Int("first_k_dense_replace", 0);
        var (moeLayers, denseLayers) = Blocks.SplitByMlpLayerTypes(c, layers, i => i >= firstDense);
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder(p + "ForCausalLM", layout);
        Blocks.CausalLm(b, p, vocab, hidden, layers, tie, i =>
        {
            Blocks.Attention(b, p + "Attention", hidden, heads, kv, headDim, bias, bias);
            if (moeSet.Contains(i))
            {
                using (b.Scope("mlp", p + "SparseMoeBlock", ModuleLocation.Other))
                {
                    Blocks.TopKRouter(b, "gate", p + "TopKRouter", experts, hidden);
                    Blocks.Experts(b, layout, p, experts, hidden, inter, actClass, Blocks.ExpertNames.Proj);
                    if (shared > 0)
                        Blocks.GatedMlp(b, "shared_experts", p + "MLP", hidden, inter * shared, false, actClass, ModuleLocation.SharedExpert);
                }
            }
            else
            {
                Blocks.GatedMlp(b, "mlp", p + "MLP", hidden, denseInter, false, actClass, ModuleLocation.Mlp);
            }
            b.RmsNorm("input_layernorm", normClass, hidden, ModuleLocation.Norm);
        }, normClass: normClass);

        var selection = c.String("expert_selection_fn", "softmax");
        var routing = selection == "sigmoid"
            ? $"top-{topK} of {experts} router logits, sigmoid of the selected" + (c.Bool("norm_topk_prob", true) ? ", renormalised" : "")
            : $"top-{topK} of {experts} router logits, softmax over the selected";
        if (shared > 0) routing += $", shared experts combined by {c.String("shared_expert_combination_strategy", "average")}";
        var moe = new MoeFacts(experts, topK, shared, inter, shared > 0 ? inter * shared : 0, moeLayers, denseLayers, routing);
        var spec = Blocks.Spec(c, "cohere2_moe", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);
        if (selection is not ("softmax" or "sigmoid"))
            throw new ConfigException($"config field 'expert_selection_fn' must be 'softmax' or 'sigmoid', got '{selection}'");
        var combine = c.String("shared_expert_combination_strategy", "average");
        if (shared > 0 && combine is not ("sum" or "average"))
            throw new ConfigException($"config field 'shared_expert_combination_strategy' must be 'sum' or 'average', got '{combine}'");

        // Cohere's parallel block: out = x + attn(n(x)) + mlp(n(x)) with one input_layernorm (RMSNorm when rms_norm_eps is
        // set, else a bias-free LayerNorm in fp32); rope (repeat-interleaved pairs, in fp32) only on sliding layers, or on
        // dense prefix layers when prefix_dense_sliding_window_pattern == 1; logits × logit_scale.
        var norm = c.Has("rms_norm_eps") && c.Json["rms_norm_eps"] is not null
            ? new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6))
            : new NormSettings(NormKind.LayerNormNoBias, c.Double("layer_norm_eps", 1e-5));
        var layerTypes = c.StringList("layer_types");
        var pattern = c.Positive("sliding_window_pattern", 4);
        var prefixPattern = c.Positive("prefix_dense_sliding_window_pattern", 1);
        string LayerType(int i) => layerTypes is not null ? layerTypes[i]
            : i < firstDense ? ((i + 1) % prefixPattern != 0 ? "sliding_attention" : "full_attention")
            : ((i - firstDense + 1) % pattern != 0 ? "sliding_attention" : "full_attention");
        if (layerTypes is not null && layerTypes.Count < layers)
            throw new ConfigException($"config field 'layer_types' has {layerTypes.Count} entries but num_hidden_layers is {layers}");
        var router = new TopKLogitsRouterSettings("gate", experts, topK, selection == "sigmoid" ? TopKScore.Sigmoid : TopKScore.SoftmaxFp32,
            c.Bool("norm_topk_prob", true), LogitsInFp32: false);
        var moeFf = new MoeSettings(router, new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, inter, act),
            shared > 0 ? new SharedExpertSettings("shared_experts", inter * shared, act, null) : null, MoeOrder.RouterFirst,
            new MoeOptions(SharedAverage: shared > 0 && combine == "average"));
        var form = new LayerForm(["self_attn", "mlp", "input_layernorm"], new NamedNorm("input_layernorm", norm), null, null, null, Parallel: true);
        var all = new List<DecoderLayerRuntime>();
        for (int i = 0; i < layers; i++)
        {
            var sliding = LayerType(i) == "sliding_attention";
            var forceRope = !moeSet.Contains(i) && prefixPattern == 1;
            var mask = sliding ? new MaskSettings(MaskKind.Sliding, c.Positive("sliding_window", 4096)) : MaskSettings.Full;
            var attn = new StandardAttentionSettings(heads, kv, headDim, bias, bias, QkNormKind.None, 0, Sinks: false, mask, headDim,
                new StandardAttentionOptions(Rotary: sliding || forceRope ? RotaryStyle.InterleavedPairs : RotaryStyle.None));
            FeedForwardSettings ff = moeSet.Contains(i) ? moeFf : new GatedMlpSettings(denseInter, act);
            all.Add(new DecoderLayerRuntime(attn, "mlp", ff, norm, norm, form));
        }
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, RopeSettings.Read(c, 10000.0, headDim), all,
                Scaling: new ModelScaling(LogitsMultiplier: c.Double("logit_scale", 0.0625))),
        };
    }
}
