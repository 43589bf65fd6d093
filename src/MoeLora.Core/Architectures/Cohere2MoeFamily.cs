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
        return Blocks.Spec(c, "cohere2_moe", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);
    }
}
