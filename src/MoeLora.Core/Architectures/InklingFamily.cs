using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Inkling text (<c>inkling_text</c>, <c>InklingForCausalLM</c>): no rotary embedding; attention adds an r_proj
/// (heads·d_rel) with a learned relative-position bias bank (rel_logits_proj.proj [d_rel, extent]), depthwise short
/// convolutions on k and v, q/k norms. <c>layer_types</c> picks per layer the sliding-window geometry
/// (hybrid_sliding: swa_* heads and head_dim, extent = sliding_window_size) or the global one (hybrid: extent =
/// rel_extent); by default every sixth layer is global. <c>mlp_layer_types</c> picks an MoE (sparse) or a dense MLP
/// with a global scale. The MoE router scores n_routed + n_shared experts (sigmoid, e_score_correction_bias for the
/// choice); routed experts are fused (gate_up_proj / down_proj) and the n_shared experts are 3-D parameters too
/// (gate_proj, up_proj [S, I, H], down_proj [S, H, I]), so no module-name target reaches any expert. Each layer also
/// has short convolutions before attention and MLP. The LM head is never tied.
/// <para>Not in transformers 4.57: <see cref="Layout.V4"/> means the on-disk layout of <c>InklingForCausalLM</c>, the v5 names.</para>
/// </summary>
internal sealed class InklingFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["inkling_text"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: InklingTextConfig.
        var vocab = c.Positive("vocab_size", 201024);
        var hidden = c.Positive("hidden_size", 6144);
        var layers = c.Positive("num_hidden_layers", 66);
        var global = new Geometry(c.Positive("num_attention_heads", 64), c.Positive("num_key_value_heads", 8),
            c.Positive("head_dim", 128), c.Positive("rel_extent", 1024));
        var window = c.FirstInt("sliding_window_size", "sliding_window") ?? 512;
        var local = new Geometry(c.Positive("swa_num_attention_heads", 64), c.Positive("swa_num_key_value_heads", 16),
            c.Positive("swa_head_dim", 128), window);
        var dRel = c.Positive("d_rel", 16);
        var kernel = c.FirstInt("conv_kernel_size", "sconv_kernel_size") ?? 4;
        var inter = c.FirstInt("dense_intermediate_size", "intermediate_size") ?? 24576;
        var moeInter = c.Positive("moe_intermediate_size", 3072);
        var experts = c.FirstInt("n_routed_experts", "num_local_experts") ?? 256;
        var shared = c.Positive("n_shared_experts", 2);
        var topK = c.Positive("num_experts_per_tok", 6);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        var types = c.StringList("layer_types") ?? Enumerable.Range(0, (int)layers)
            .Select(i => (c.IntList("local_layer_ids") is { } ids ? ids.Contains(i) : (i + 1) % 6 != 0) ? "hybrid_sliding" : "hybrid").ToList();
        var denseIdx = c.Int("dense_mlp_idx", 0);
        var mlpTypes = c.StringList("mlp_layer_types")
            ?? Enumerable.Range(0, (int)layers).Select(i => i < denseIdx ? "dense" : "sparse").ToList();
        if (types.Count < layers || mlpTypes.Count < layers)
            throw new ConfigException($"config fields 'layer_types' and 'mlp_layer_types' need {layers} entries");
        Blocks.CheckLayerTypes(types, "layer_types", "hybrid", "hybrid_sliding");
        Blocks.CheckLayerTypes(mlpTypes, "mlp_layer_types", "sparse", "dense");

        var b = new TreeBuilder("InklingForCausalLM", layout);
        using (b.Scope("model", "InklingTextModel"))
        {
            b.Embedding("embed_tokens", vocab, hidden);
            b.ModuleList("layers", layers, i =>
            {
                using (b.Scope(i.ToString(System.Globalization.CultureInfo.InvariantCulture), "InklingDecoderLayer", ModuleLocation.Other, layer: i))
                {
                    Attention(b, hidden, types[i] == "hybrid_sliding" ? local : global, dRel, kernel);
                    if (mlpTypes[i] == "sparse") Moe(b, hidden, experts, shared, moeInter, actClass);
                    else
                    {
                        using (b.Scope("mlp", "InklingMLP", ModuleLocation.Mlp))
                        {
                            b.Param("global_scale", 1);
                            b.Linear("gate_proj", hidden, inter);
                            b.Linear("up_proj", hidden, inter);
                            b.Linear("down_proj", inter, hidden);
                            b.Leaf("act_fn", actClass);
                        }
                    }
                    b.RmsNorm("input_layernorm", "InklingRMSNorm", hidden, ModuleLocation.Norm);
                    b.RmsNorm("post_attention_layernorm", "InklingRMSNorm", hidden, ModuleLocation.Norm);
                    ShortConv(b, "attn_sconv", hidden, kernel);
                    ShortConv(b, "mlp_sconv", hidden, kernel);
                }
            });
            b.RmsNorm("norm", "InklingRMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("embed_norm", "InklingRMSNorm", hidden, ModuleLocation.Norm);
        }
        b.Linear("lm_head", hidden, vocab, location: ModuleLocation.LmHead);

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers, i => mlpTypes[i] == "sparse");
        var routing = $"sigmoid over {experts} routed + {shared} shared experts (+ e_score_correction_bias for the choice), " +
            $"top-{topK} routed; the chosen and shared experts' log-sigmoids are softmax-normalised together and scaled by route_scale";
        var moe = new MoeFacts(experts, topK, shared, moeInter, moeInter, moeLayers, denseLayers, routing);
        return Blocks.Spec(c, "inkling_text", b.Build(), moe, hidden, layers, vocab, global.Heads, global.KvHeads, tie: false, act) with
        {
            RuntimeUnavailable = "Inkling's per-layer attention geometry and expert layout",
        };
    }

    private sealed record Geometry(long Heads, long KvHeads, long HeadDim, long RelExtent);

    private static void Attention(TreeBuilder b, long hidden, Geometry g, long dRel, long kernel)
    {
        using (b.Scope("self_attn", "InklingAttention", ModuleLocation.Attention))
        {
            b.Linear("q_proj", hidden, g.Heads * g.HeadDim);
            b.Linear("k_proj", hidden, g.KvHeads * g.HeadDim);
            b.Linear("v_proj", hidden, g.KvHeads * g.HeadDim);
            b.Linear("r_proj", hidden, g.Heads * dRel);
            b.Linear("o_proj", g.Heads * g.HeadDim, hidden);
            ShortConv(b, "k_sconv", g.KvHeads * g.HeadDim, kernel);
            ShortConv(b, "v_sconv", g.KvHeads * g.HeadDim, kernel);
            b.RmsNorm("q_norm", "InklingRMSNorm", g.HeadDim);
            b.RmsNorm("k_norm", "InklingRMSNorm", g.HeadDim);
            using (b.Scope("rel_logits_proj", "InklingRelativeLogits", kind: ModuleKind.Other))
                b.Param("proj", dRel, g.RelExtent);
        }
    }

    private static void Moe(TreeBuilder b, long hidden, long experts, long shared, long moeInter, string actClass)
    {
        using (b.Scope("mlp", "InklingMoE", ModuleLocation.Other))
        {
            using (b.Scope("gate", "InklingTopkRouter", ModuleLocation.Router, kind: ModuleKind.Router))
            {
                b.Param("weight", experts + shared, hidden);
                b.Param("global_scale", 1);
            }
            Blocks.FusedExperts(b, "InklingExperts", experts, hidden, moeInter, actClass);
            using (b.Scope("shared_experts", "InklingSharedExperts", ModuleLocation.SharedExpert, kind: ModuleKind.Experts, numExperts: shared))
            {
                b.Param("gate_proj", shared, moeInter, hidden);
                b.Param("up_proj", shared, moeInter, hidden);
                b.Param("down_proj", shared, hidden, moeInter);
                b.Leaf("act_fn", actClass);
            }
        }
    }

    /// <summary>InklingShortConvolution: a depthwise Conv1d without bias.</summary>
    private static void ShortConv(TreeBuilder b, string name, long channels, long kernel)
    {
        using (b.Scope(name, "InklingShortConvolution"))
        using (b.Scope("conv1d", "Conv1d", kind: ModuleKind.Other))
            b.Param("weight", channels, 1, kernel);
    }
}
