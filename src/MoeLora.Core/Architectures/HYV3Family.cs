using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Hunyuan V3 (<c>hy_v3</c>): Llama attention with per-head q/k RMSNorm, dense or MoE per <c>mlp_layer_types</c>
/// (default: the first layer dense). The MoE block registers gate (a TopK router holding weight [E, H]), experts, the
/// persistent <c>e_score_correction_bias</c> buffer (on the block, not the router), then shared_experts
/// (<c>num_shared_experts</c> fused into one MLP). HY V3 did not exist in transformers 4.57: <see cref="Layout.V4"/>
/// means the on-disk checkpoint layout: <c>mlp.router.gate</c>, <c>mlp.expert_bias</c>, <c>mlp.shared_mlp</c> and
/// per-expert <c>experts.{e}.gate_proj/up_proj/down_proj</c> (a ModuleList of HYV3MLP).
/// </summary>
internal sealed class HYV3Family : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["hy_v3"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: HYV3Config (5.17).
        var vocab = c.Positive("vocab_size", 120832);
        var hidden = c.Positive("hidden_size", 4096);
        var inter = c.Positive("intermediate_size", 13312);
        var layers = c.Positive("num_hidden_layers", 80);
        var heads = c.Positive("num_attention_heads", 64);
        var kv = c.IntOrNull("num_key_value_heads", 8) ?? heads;
        var headDim = Blocks.HeadDim(c, hidden, heads, 128);
        var experts = c.FirstInt("num_experts", "num_local_experts") ?? 192;
        var topK = c.Positive("num_experts_per_tok", 8);
        var shared = c.Int("num_shared_experts", 1);
        var moeInter = c.Positive("moe_intermediate_size", 1536);
        var attnBias = c.Bool("attention_bias", false);
        var mlpBias = c.Bool("mlp_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var sharedInter = moeInter * shared;

        var (moeLayers, denseLayers) = Blocks.SplitByMlpLayerTypes(c, layers, i => i >= 1);
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder("HYV3ForCausalLM", layout);
        Blocks.CausalLm(b, "HYV3", vocab, hidden, layers, tie, i =>
        {
            Blocks.Attention(b, "HYV3Attention", hidden, heads, kv, headDim, attnBias, attnBias, afterProjections: bb =>
            {
                bb.RmsNorm("q_norm", "HYV3RMSNorm", headDim);
                bb.RmsNorm("k_norm", "HYV3RMSNorm", headDim);
            });
            if (!moeSet.Contains(i))
            {
                Blocks.GatedMlp(b, "mlp", "HYV3MLP", hidden, inter, mlpBias, actClass, ModuleLocation.Mlp);
            }
            else
            {
                using (b.Scope("mlp", "HYV3MoE", ModuleLocation.Other))
                {
                    if (layout == Layout.V5)
                    {
                        Blocks.TopKRouter(b, "gate", "HYV3TopKRouter", experts, hidden);
                        Blocks.FusedExperts(b, "HYV3Experts", experts, hidden, moeInter, actClass);
                        b.Buffer("e_score_correction_bias", experts);
                    }
                    else
                    {
                        using (b.Scope("router", "HYV3TopKRouter", ModuleLocation.Router))
                            b.Linear("gate", hidden, experts);
                        Blocks.PerExpertMlps(b, "ModuleList", "HYV3MLP", experts, hidden, moeInter, actClass);
                        b.Buffer("expert_bias", experts);
                    }
                    Blocks.GatedMlp(b, layout == Layout.V5 ? "shared_experts" : "shared_mlp", "HYV3MLP", hidden, sharedInter, mlpBias,
                        actClass, ModuleLocation.SharedExpert);
                }
            }
            b.RmsNorm("input_layernorm", "HYV3RMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "HYV3RMSNorm", hidden, ModuleLocation.Norm);
        });

        var routing = $"sigmoid scores + e_score_correction_bias (selection only), top-{topK} of {experts}, renormalised, " +
            $"scaled by {c.Double("router_scaling_factor", 2.826).ToString(System.Globalization.CultureInfo.InvariantCulture)}";
        var moe = new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers, routing);

        // Runtime: Apertus attention (per-head q/k norms before rope, biases per attention_bias); the router's sigmoid
        // selection uses the MoE block's correction bias; routed and shared outputs are summed in fp32 while
        // enable_moe_fp32_combine (default true).
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-5));
        var attention = new StandardAttentionSettings(heads, kv, headDim, attnBias, attnBias, QkNormKind.PerHead, norm.Eps, Sinks: false,
            MaskSettings.Full, headDim);
        var sparse = new MoeSettings(
            new SigmoidBiasRouterSettings("gate", experts, topK, new ScoreBias("e_score_correction_bias", ScoreBiasOwner.Block, IsParameter: false),
                NormTopK: true, NormEps: 1e-20, Scale: c.Double("router_scaling_factor", 2.826), SoftCap: 0, LinearInFp32: true),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
            new SharedExpertSettings("shared_experts", sharedInter, act, SigmoidGateName: null, Bias: mlpBias), MoeOrder.RouterFirst,
            new MoeOptions(SumInFp32: c.Bool("enable_moe_fp32_combine", true)));
        var dense = new GatedMlpSettings(inter, act, mlpBias);
        var runtimeLayers = Enumerable.Range(0, (int)layers)
            .Select(i => new DecoderLayerRuntime(attention, "mlp", moeSet.Contains(i) ? sparse : dense, norm, norm)).ToList();
        return Blocks.Spec(c, "hy_v3", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.006), norm,
                RopeSettings.Read(c, 11_158_840.0, headDim), runtimeLayers),
        };
    }
}
