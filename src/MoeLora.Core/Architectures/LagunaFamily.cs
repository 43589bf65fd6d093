using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Laguna (<c>laguna</c>) and Mellum (<c>mellum</c>, built from Laguna's layer and Qwen3-MoE's blocks), both new in
/// transformers 5: Layout.V4 means the on-disk checkpoint layout (v5 module classes, experts as a per-expert
/// ModuleList of gate_proj/up_proj/down_proj, which transformers fuses on load).
/// <para>
/// <c>mlp_layer_types</c> picks a dense MLP of <c>intermediate_size</c> or the MoE block per layer (Laguna's default:
/// layer 0 dense, the rest sparse; Mellum's: all sparse). The MoE block registers experts, then the router. Attention
/// has per-head q/k RMSNorms. Laguna adds: per-layer query heads (<c>num_attention_heads_per_layer</c>), an output
/// gate g_proj (one value per head when <c>gating</c> is True or "per-head", else per head and channel), a shared
/// expert (<c>shared_experts</c>, stored as <c>shared_expert</c>) and sigmoid routing whose
/// <c>e_score_correction_bias</c> is a frozen parameter of the router (stored under <c>experts</c>).
/// </para>
/// </summary>
internal sealed class LagunaFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["laguna", "mellum"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var type = c.ModelType!;
        var laguna = type == "laguna";
        var p = laguna ? "Laguna" : "Mellum";
        // Defaults: LagunaConfig / MellumConfig.
        var vocab = c.Positive("vocab_size", laguna ? 100352 : 98304);
        var hidden = c.Positive("hidden_size", laguna ? 2048 : 2304);
        var inter = c.Positive("intermediate_size", laguna ? 8192 : 7168);
        var layers = c.Positive("num_hidden_layers", laguna ? 40 : 28);
        var heads = c.Positive("num_attention_heads", laguna ? 48 : 32);
        var kv = c.Positive("num_key_value_heads", laguna ? 8 : 4);
        var headDim = c.Positive("head_dim", 128);
        // Mellum stores num_local_experts (num_experts is its alias); Laguna num_experts.
        var experts = (laguna ? c.FirstInt("num_experts") : c.FirstInt("num_local_experts", "num_experts")) ?? (laguna ? 256 : 64);
        var topK = c.Positive("num_experts_per_tok", 8);
        var moeInter = c.Positive("moe_intermediate_size", laguna ? 512 : 896);
        var sharedInter = laguna ? c.Positive("shared_expert_intermediate_size", 512) : 0;
        var bias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        var headsPerLayer = laguna ? c.IntList("num_attention_heads_per_layer") : null;
        if (headsPerLayer is not null && headsPerLayer.Count != layers)
            throw new ConfigException($"config field 'num_attention_heads_per_layer' has {headsPerLayer.Count} entries but num_hidden_layers is {layers}");
        // LagunaAttention: gate_per_head = gating is True or gating == "per-head" (class default True).
        var gatePerHead = !c.Json.TryGetPropertyValue("gating", out var gating) || gating?.ToJsonString() is "true" or "\"per-head\"";
        var (moeLayers, denseLayers) = Blocks.SplitByMlpLayerTypes(c, layers, i => !laguna || i > 0);
        var moeSet = moeLayers.ToHashSet();

        var b = new TreeBuilder(p + "ForCausalLM", layout);
        Blocks.CausalLm(b, p, vocab, hidden, layers, tie, i =>
        {
            var h = headsPerLayer?[i] ?? heads;
            Blocks.Attention(b, p + "Attention", hidden, h, kv, headDim, bias, bias, afterProjections: bb =>
            {
                bb.RmsNorm("q_norm", p + "RMSNorm", headDim);
                bb.RmsNorm("k_norm", p + "RMSNorm", headDim);
                if (laguna) bb.Linear("g_proj", hidden, gatePerHead ? h : h * headDim);
            });
            if (moeSet.Contains(i))
            {
                using (b.Scope("mlp", p + "SparseMoeBlock", ModuleLocation.Other))
                {
                    // On disk Laguna keeps the router's correction bias under experts.
                    Blocks.Experts(b, layout, p, experts, hidden, moeInter, actClass, Blocks.ExpertNames.Proj,
                        v4Extra: laguna ? () => b.Param("e_score_correction_bias", experts) : null);
                    using (b.Scope("gate", p + "TopKRouter", ModuleLocation.Router, kind: ModuleKind.Router))
                    {
                        b.Param("weight", experts, hidden);
                        if (laguna && layout == Layout.V5) b.Param("e_score_correction_bias", experts);
                    }
                    if (laguna)
                        Blocks.GatedMlp(b, layout == Layout.V5 ? "shared_experts" : "shared_expert", p + "MLP", hidden,
                            sharedInter, false, actClass, ModuleLocation.SharedExpert);
                }
            }
            else
            {
                Blocks.GatedMlp(b, "mlp", p + "MLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
            }
            b.RmsNorm("input_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
        });

        var routing = laguna
            ? $"sigmoid of {experts} router logits; top-{topK} chosen on sigmoid + e_score_correction_bias, their sigmoids renormalised, plus a shared expert"
            : $"softmax over {experts} experts, top-{topK}" + (c.Bool("norm_topk_prob", true) ? ", renormalised" : "");
        var moe = new MoeFacts(experts, topK, laguna ? 1 : 0, moeInter, sharedInter, moeLayers, denseLayers, routing);
        var spec = Blocks.Spec(c, type, b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);
        if (laguna && c.Bool("moe_apply_router_weight_on_input", false))
            throw new ConfigException("config field 'moe_apply_router_weight_on_input' = true is not supported by transformers' Laguna");

        // Pre-norm; per-head q/k norms; each layer's rope from rope_parameters[layer_type] (its own theta and partial
        // rotary factor; full layers default to theta 500000, Laguna's at half the head rotated); sliding layers mask
        // to sliding_window. Laguna: softplus output gate g_proj (per head or per element), a sigmoid router with
        // optional logit soft-capping and the router's e_score_correction_bias, routed output × moe_routed_scaling_factor,
        // plus the shared expert. Mellum: Qwen3-MoE's softmax router.
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6));
        var layerTypes = c.StringList("layer_types") ?? Enumerable.Repeat("full_attention", (int)layers).ToList();
        if (layerTypes.Count != layers)
            throw new ConfigException($"config field 'layer_types' has {layerTypes.Count} entries but num_hidden_layers is {layers}");
        RopeSettings LayerRope(string layerType)
        {
            var o = c.Sub("rope_parameters")?.Sub(layerType);
            var json = o?.Json.DeepClone().AsObject() ?? new System.Text.Json.Nodes.JsonObject
            {
                ["rope_type"] = "default",
                ["rope_theta"] = layerType == "sliding_attention" ? 10000.0 : 500000.0,
                ["partial_rotary_factor"] = laguna && layerType != "sliding_attention" ? 0.5 : 1.0,
            };
            var wrapped = new ModelConfig(new System.Text.Json.Nodes.JsonObject { ["rope_parameters"] = json });
            var dim = (long)(headDim * RopeSettings.PartialRotaryFactor(wrapped, 1.0));
            return RopeSettings.Read(wrapped, 10000.0, dim);
        }
        var ropes = layerTypes.Distinct().ToDictionary(t => t, LayerRope);
        FeedForwardSettings moeFf = laguna
            ? new MoeSettings(new SigmoidBiasRouterSettings("gate", experts, topK, new ScoreBias("e_score_correction_bias", ScoreBiasOwner.Router, IsParameter: true),
                    NormTopK: true, NormEps: 0, Scale: 1.0, SoftCap: c.Double("moe_router_logit_softcapping", 0.0),
                    WeightsToModelDtype: true),
                new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
                new SharedExpertSettings("shared_experts", sharedInter, act, null), MoeOrder.ExpertsFirst,
                new MoeOptions(RoutedScale: c.Double("moe_routed_scaling_factor", 1.0)))
            : new MoeSettings(new SoftmaxTopKRouterSettings("gate", experts, topK, c.Bool("norm_topk_prob", true)),
                new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act), Shared: null, MoeOrder.ExpertsFirst);
        var all = new List<DecoderLayerRuntime>();
        for (int i = 0; i < layers; i++)
        {
            var h = headsPerLayer?[i] ?? heads;
            var rope = ropes[layerTypes[i]];
            var sliding = layerTypes[i] == "sliding_attention";
            var mask = sliding ? new MaskSettings(MaskKind.Sliding, c.Positive("sliding_window", laguna ? 512 : 1024)) : MaskSettings.Full;
            var gate = laguna ? new OutputGate("g_proj", OutputGateKind.Softplus, gatePerHead) : null;
            var attn = new StandardAttentionSettings(h, kv, headDim, bias, bias, QkNormKind.PerHead, norm.Eps, Sinks: false, mask, rope.Dim,
                new StandardAttentionOptions(Rope: rope, Gate: gate));
            FeedForwardSettings ff = moeSet.Contains(i) ? moeFf : new GatedMlpSettings(inter, act);
            all.Add(new DecoderLayerRuntime(attn, "mlp", ff, norm, norm));
        }
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, ropes[layerTypes[0]], all),
        };
    }
}
