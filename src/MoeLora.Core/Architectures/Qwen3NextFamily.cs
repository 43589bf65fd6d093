using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Qwen3-Next (<c>qwen3_next</c>): a hybrid of gated full attention and Gated DeltaNet linear attention, chosen per
/// layer by <c>layer_types</c> (default: every <c>full_attention_interval</c>-th layer, 4, is full attention). The
/// feed-forward block follows the Qwen2-MoE rule (MoE unless in <c>mlp_only_layers</c> or off the
/// <c>decoder_sparse_step</c>), with a shared expert and a sigmoid shared-expert gate.
/// <para>
/// Full attention: q_proj projects to 2·heads·head_dim (query and output gate), q/k norms per head. Linear attention
/// (Qwen3NextGatedDeltaNet): its own dt_bias and A_log [num_v_heads] come first in named_parameters, then a depthwise
/// Conv1d over q|k|v (no bias), in_proj_qkvz, in_proj_ba, a gated RMSNorm over head_v_dim and out_proj.
/// </para>
/// <para>v4 (4.57) differs only in the MoE block: gate is an nn.Linear and experts a per-expert ModuleList.</para>
/// </summary>
internal sealed class Qwen3NextFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["qwen3_next"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: Qwen3NextConfig.
        var vocab = c.Positive("vocab_size", 151936);
        var hidden = c.Positive("hidden_size", 2048);
        var inter = c.Positive("intermediate_size", 5632);
        var layers = c.Positive("num_hidden_layers", 48);
        var heads = c.Positive("num_attention_heads", 16);
        var kv = c.IntOrNull("num_key_value_heads", 2) ?? heads;
        var headDim = Blocks.HeadDim(c, hidden, heads, classDefault: 256);
        var convKernel = c.Positive("linear_conv_kernel_dim", 4);
        var kHeadDim = c.Positive("linear_key_head_dim", 128);
        var vHeadDim = c.Positive("linear_value_head_dim", 128);
        var kHeads = c.Positive("linear_num_key_heads", 16);
        var vHeads = c.Positive("linear_num_value_heads", 32);
        var experts = c.Int("num_experts", 512);
        var topK = c.Positive("num_experts_per_tok", 10);
        var moeInter = c.Positive("moe_intermediate_size", 512);
        var sharedInter = c.Int("shared_expert_intermediate_size", 512);
        var step = c.Int("decoder_sparse_step", 1);
        var mlpOnly = new HashSet<long>(c.IntList("mlp_only_layers") ?? []);
        var bias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        var interval = c.Int("full_attention_interval", 4);
        var layerTypes = c.StringList("layer_types")
            ?? Enumerable.Range(0, (int)layers).Select(i => (i + 1) % interval != 0 ? "linear_attention" : "full_attention").ToList();

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers,
            i => !mlpOnly.Contains(i) && experts > 0 && step > 0 && (i + 1) % step == 0);
        var moeSet = moeLayers.ToHashSet();

        var keyDim = kHeadDim * kHeads;
        var valueDim = vHeadDim * vHeads;

        var b = new TreeBuilder("Qwen3NextForCausalLM", layout);
        Blocks.CausalLm(b, "Qwen3Next", vocab, hidden, layers, tie, i =>
        {
            var type = i < layerTypes.Count ? layerTypes[i] : "full_attention";
            if (type == "linear_attention")
            {
                using (b.Scope("linear_attn", "Qwen3NextGatedDeltaNet", ModuleLocation.Attention))
                {
                    b.Param("dt_bias", vHeads);
                    b.Param("A_log", vHeads);
                    // A depthwise nn.Conv1d: PEFT could wrap it with lora.Conv1d, but all-linear never selects it.
                    using (b.Scope("conv1d", "Conv1d", kind: ModuleKind.Other))
                        b.Param("weight", keyDim * 2 + valueDim, 1, convKernel);
                    b.Linear("in_proj_qkvz", hidden, keyDim * 2 + valueDim * 2);
                    b.Linear("in_proj_ba", hidden, vHeads * 2);
                    b.RmsNorm("norm", "Qwen3NextRMSNormGated", vHeadDim);
                    b.Linear("out_proj", valueDim, hidden);
                }
            }
            else
            {
                using (b.Scope("self_attn", "Qwen3NextAttention", ModuleLocation.Attention))
                {
                    // q_proj also produces the per-head output gate, hence 2·heads·head_dim.
                    b.Linear("q_proj", hidden, heads * headDim * 2, bias);
                    b.Linear("k_proj", hidden, kv * headDim, bias);
                    b.Linear("v_proj", hidden, kv * headDim, bias);
                    b.Linear("o_proj", heads * headDim, hidden, bias);
                    b.RmsNorm("q_norm", "Qwen3NextRMSNorm", headDim);
                    b.RmsNorm("k_norm", "Qwen3NextRMSNorm", headDim);
                }
            }
            if (moeSet.Contains(i))
            {
                using (b.Scope("mlp", "Qwen3NextSparseMoeBlock", ModuleLocation.Other))
                {
                    if (layout == Layout.V5)
                    {
                        Blocks.TopKRouter(b, "gate", "Qwen3NextTopKRouter", experts, hidden);
                        Blocks.FusedExperts(b, "Qwen3NextExperts", experts, hidden, moeInter, actClass);
                    }
                    else
                    {
                        b.Linear("gate", hidden, experts, location: ModuleLocation.Router);
                        Blocks.PerExpertMlps(b, "Qwen3NextExperts", "Qwen3NextMLP", experts, hidden, moeInter, actClass);
                    }
                    Blocks.GatedMlp(b, "shared_expert", "Qwen3NextMLP", hidden, sharedInter, false, actClass, ModuleLocation.SharedExpert);
                    b.Linear("shared_expert_gate", hidden, 1, location: ModuleLocation.SharedExpert);
                }
            }
            else
            {
                Blocks.GatedMlp(b, "mlp", "Qwen3NextMLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
            }
            b.RmsNorm("input_layernorm", "Qwen3NextRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "Qwen3NextRMSNorm", hidden, ModuleLocation.Norm);
        });

        var normTopK = c.Bool("norm_topk_prob", true);
        var routing = $"softmax over {experts} experts, top-{topK}" + (normTopK ? ", renormalised" : "") +
            ", plus a sigmoid-gated shared expert";
        var moe = new MoeFacts(experts, topK, 1, moeInter, sharedInter, moeLayers, denseLayers, routing);
        var spec = Blocks.Spec(c, "qwen3_next", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        // Every RMSNorm but the gated one is zero-centred: (1 + weight), the weight starting at zero.
        var eps = c.Double("rms_norm_eps", 1e-6);
        var norm = new NormSettings(NormKind.RmsOnePlusWeight, eps);
        var rotaryDim = (long)(headDim * RopeSettings.PartialRotaryFactor(c, 0.25));
        var attention = new StandardAttentionSettings(heads, kv, headDim, bias, bias, QkNormKind.PerHead, eps, Sinks: false,
            MaskSettings.Full, rotaryDim, new StandardAttentionOptions(QkNormType: NormKind.RmsOnePlusWeight, GateInQuery: true));
        // transformers' Qwen3-Next applies F.silu after the convolution whatever hidden_act says.
        var deltaNet = new GatedDeltaNetSettings(kHeads, vHeads, kHeadDim, vHeadDim, convKernel, DeltaNetProjections.FusedQkvzBa, eps);
        var sparse = new MoeSettings(new SoftmaxTopKRouterSettings("gate", experts, topK, normTopK),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
            new SharedExpertSettings("shared_expert", sharedInter, act, SigmoidGateName: "shared_expert_gate"), MoeOrder.RouterFirst);
        var dense = new GatedMlpSettings(inter, act);
        var runtimeLayers = Enumerable.Range(0, (int)layers).Select(i => i < layerTypes.Count && layerTypes[i] == "linear_attention"
            ? new DecoderLayerRuntime(deltaNet, "mlp", moeSet.Contains(i) ? sparse : dense, norm, norm, GatedDeltaNetSettings.PreNormLayer(norm, norm))
            : new DecoderLayerRuntime(attention, "mlp", moeSet.Contains(i) ? sparse : dense, norm, norm)).ToList();
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm,
                RopeSettings.Read(c, 10000.0, rotaryDim), runtimeLayers),
        };
    }
}
