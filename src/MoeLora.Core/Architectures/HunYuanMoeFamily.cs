using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Hunyuan-A13B (<c>hunyuan_v1_moe</c>): every layer MoE. Attention normalises queries and keys per head after the
/// projections (<c>query_layernorm</c> / <c>key_layernorm</c>); the MoE block registers its router as
/// <c>gate.wg</c> (an nn.Linear inside HunYuanMoEV1Gate, so all-linear reaches it), the experts (of
/// <c>intermediate_size</c>) and one always-present shared MLP <c>shared_mlp</c> of the same size.
/// <para>
/// <c>head_dim</c> is read with getattr, but HunYuanMoEV1Config declares it with default None, so a config without it
/// cannot be built by transformers either: it is required here. <c>num_experts</c> and <c>moe_topk</c> may be per-layer
/// lists for the router, but HunYuanMoEV1Experts sizes itself from the (list) value and fails, so only integers build.
/// </para>
/// <para>v4 (4.57, same as the checkpoint): per-expert <c>experts.{e}.gate_proj/up_proj/down_proj</c>.</para>
/// </summary>
internal sealed class HunYuanMoeFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["hunyuan_v1_moe"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        const string p = "HunYuanMoEV1";
        // Defaults: HunYuanMoEV1Config (attribute_map: num_local_experts → num_experts, num_experts_per_tok → moe_topk).
        var vocab = c.Positive("vocab_size", 290943);
        var hidden = c.Positive("hidden_size", 4096);
        var inter = c.Positive("intermediate_size", 11008);
        var layers = c.Positive("num_hidden_layers", 32);
        var heads = c.Positive("num_attention_heads", 32);
        var kv = c.IntOrNull("num_key_value_heads", null) ?? heads;
        var headDim = c.IntOrNull("head_dim", null)
            ?? throw new ConfigException("config field 'head_dim' is required for hunyuan_v1_moe (HunYuanMoEV1Attention multiplies by it; its config default is None)");
        if (headDim <= 0) throw new ConfigException($"config field 'head_dim' must be a positive integer, got {headDim}");
        var experts = c.Positive("num_experts", 1);
        var topK = c.Positive("moe_topk", 1);
        var bias = c.Bool("attention_bias", false);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);

        var b = new TreeBuilder(p + "ForCausalLM", layout);
        Blocks.CausalLm(b, p, vocab, hidden, layers, tie, _ =>
        {
            Blocks.Attention(b, p + "Attention", hidden, heads, kv, headDim, bias, bias, afterProjections: bb =>
            {
                bb.RmsNorm("query_layernorm", p + "RMSNorm", headDim);
                bb.RmsNorm("key_layernorm", p + "RMSNorm", headDim);
            });
            using (b.Scope("mlp", p + "Moe", ModuleLocation.Other))
            {
                using (b.Scope("gate", p + "Gate", ModuleLocation.Router))
                    b.Linear("wg", hidden, experts);
                if (layout == Layout.V5) Blocks.FusedExperts(b, p + "Experts", experts, hidden, inter, actClass);
                else Blocks.PerExpertMlps(b, "ModuleList", p + "MLP", experts, hidden, inter, actClass);
                Blocks.GatedMlp(b, "shared_mlp", p + "MLP", hidden, inter, false, actClass, ModuleLocation.SharedExpert);
            }
            b.RmsNorm("input_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
        });

        var all = Enumerable.Range(0, (int)layers).ToList();
        var moe = new MoeFacts(experts, topK, 1, inter, inter, all, [],
            $"softmax over {experts} experts, top-{topK}, renormalised, plus an always-on shared MLP");
        var spec = Blocks.Spec(c, "hunyuan_v1_moe", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        // Runtime: Llama attention whose per-head query/key norms run after rope; the fp32 gate Linear's softmax top-k,
        // renormalised; the shared MLP always added. "dynamic" rope with alpha is HunYuan's NTK-alpha table, fixed at
        // init: theta·alpha^(d/(d-2)) (transformers recomputes it only past max_position_embeddings).
        var rope = RopeSettings.Read(c, 10000.0, headDim);
        if (rope.Type == "dynamic")
        {
            var alpha = (c.Sub("rope_parameters") ?? c.Sub("rope_scaling"))?.Double("alpha", 0) ?? 0;
            if (alpha == 0) return spec with { RuntimeUnavailable = "dynamic NTK rope scaling without alpha" };
            rope = new RopeSettings("default", rope.Theta * Math.Pow(alpha, headDim / (double)(headDim - 2)), headDim);
        }
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-5));
        var attention = new StandardAttentionSettings(heads, kv, headDim, bias, bias, QkNormKind.PerHead, norm.Eps, Sinks: false,
            MaskSettings.Full, headDim, new StandardAttentionOptions(QkNormAfterRope: true, QNormName: "query_layernorm", KNormName: "key_layernorm"));
        var sparse = new MoeSettings(new LinearSoftmaxTopKRouterSettings("gate", "wg", experts, topK),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, inter, act),
            new SharedExpertSettings("shared_mlp", inter, act, SigmoidGateName: null), MoeOrder.RouterFirst);
        var layer = new DecoderLayerRuntime(attention, "mlp", sparse, norm, norm);
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, rope,
                Enumerable.Repeat(layer, (int)layers).ToList()),
        };
    }
}
