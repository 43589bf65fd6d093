using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// DBRX (identical layout in transformers 4.40-5.17): the top level is <c>transformer</c>, attention has one fused
/// <c>Wqkv</c>, every layer is MoE, the router is an nn.Linear (<c>ffn.router.layer</c>) and the experts are three
/// 2-D parameters <c>ffn.experts.mlp.{w1,v1,w2}</c> of shape [E·F, H] (w2 used as (in, out)). Because they are 2-D,
/// a PEFT <c>target_parameters</c> LoRA on them is one rank-r update of the stacked matrix, not one per expert.
/// </summary>
internal sealed class DbrxFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["dbrx"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var attn = c.Sub("attn_config") ?? new ModelConfig(new System.Text.Json.Nodes.JsonObject(), c);
        var ffn = c.Sub("ffn_config") ?? new ModelConfig(new System.Text.Json.Nodes.JsonObject(), c);
        var vocab = c.Positive("vocab_size", 32000);
        var hidden = c.Positive("d_model", 2048);
        var heads = c.Positive("n_heads", 16);
        var layers = c.Positive("n_layers", 24);
        var kv = attn.Positive("kv_n_heads", 1);
        var headDim = hidden / heads;
        var experts = ffn.Positive("moe_num_experts", 4);
        var topK = ffn.Positive("moe_top_k", 1);
        var inter = ffn.Positive("ffn_hidden_size", 3584);
        if (c.Bool("tie_word_embeddings", false))
            throw new ConfigException("DBRX does not support tie_word_embeddings=True (transformers raises)");
        var actName = ffn.Sub("ffn_act_fn")?.String("name", "silu") ?? "silu";
        var actClass = Blocks.ActivationClass(actName, layout);

        var b = new TreeBuilder("DbrxForCausalLM", layout);
        using (b.Scope("transformer", "DbrxModel"))
        {
            // DbrxModel registers its rotary embedding before the token embedding (checked, 5.17).
            b.Leaf("rotary_emb", "DbrxRotaryEmbedding");
            b.Embedding("wte", vocab, hidden);
            b.ModuleList("blocks", layers, i =>
            {
                using (b.Scope(i.ToString(System.Globalization.CultureInfo.InvariantCulture), "DbrxBlock", ModuleLocation.Other, layer: i))
                {
                    using (b.Scope("norm_attn_norm", "DbrxNormAttentionNorm"))
                    {
                        b.LayerNorm("norm_1", hidden, bias: false, location: ModuleLocation.Norm);
                        using (b.Scope("attn", "DbrxAttention", ModuleLocation.Attention))
                        {
                            b.Linear("Wqkv", hidden, hidden + 2 * kv * headDim);
                            b.Linear("out_proj", hidden, hidden);
                        }
                        b.LayerNorm("norm_2", hidden, bias: false, location: ModuleLocation.Norm);
                    }
                    using (b.Scope("ffn", "DbrxFFN"))
                    {
                        using (b.Scope("router", "DbrxRouter", ModuleLocation.Router))
                        {
                            b.Linear("layer", hidden, experts);
                        }
                        using (b.Scope("experts", "DbrxExperts", ModuleLocation.RoutedExpert))
                        using (b.Scope("mlp", "DbrxExpertGLU", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts, numExperts: experts))
                        {
                            b.Param("w1", experts * inter, hidden);
                            b.Param("v1", experts * inter, hidden);
                            b.Param("w2", experts * inter, hidden);
                            b.Leaf("activation_fn", actClass);
                        }
                    }
                }
            });
            b.LayerNorm("norm_f", hidden, bias: false, location: ModuleLocation.Norm);
        }
        b.Linear("lm_head", hidden, vocab, location: ModuleLocation.LmHead);

        var all = Enumerable.Range(0, (int)layers).ToList();
        var moe = new MoeFacts(experts, topK, 0, inter, 0, all, [], $"softmax over {experts} experts, top-{topK}");
        var spec = Blocks.Spec(c, "dbrx", b.Build(), moe, hidden, layers, vocab, heads, kv, false, actName);
        return spec with
        {
            DecoderLayersPath = "transformer.blocks",
            InputEmbeddings = "transformer.wte",
            RuntimeUnavailable = "DBRX's fused Wqkv attention, LayerNorm blocks and 2-D stacked experts",
        };
    }
}
