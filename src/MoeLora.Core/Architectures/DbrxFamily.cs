using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// DBRX (identical layout in transformers 4.40-5.17): the top level is <c>transformer</c>, attention has one fused
/// <c>Wqkv</c>, every layer is MoE, the router is an nn.Linear (<c>ffn.router.layer</c>) and the experts are three
/// 2-D parameters <c>ffn.experts.mlp.{w1,v1,w2}</c> of shape [E·F, H] (w2 used as (in, out)). Because they are 2-D,
/// a PEFT <c>target_parameters</c> LoRA on them is one rank-r update of the stacked matrix, not one per expert.
/// <para>
/// Runtime: DbrxAttention's clamped fused Wqkv, bias-free nn.LayerNorm around it in DbrxNormAttentionNorm, DbrxFFN's
/// softmax router with p-norm renormalisation and DbrxExperts' per-expert loop over the stacked matrices; checked
/// against transformers 5.17 on a fixture with <c>clip_qkv</c> 8 (logits and hidden states with a left-padded row;
/// transformers returns no router logits for DBRX). A null <c>clip_qkv</c> runs unclamped, where 5.17's forward
/// fails (earlier versions skipped the clamp). The rope theta is the top-level <c>rope_parameters</c> / <c>rope_theta</c> (default 10000) as 5.17's
/// DbrxRotaryEmbedding reads it; <c>attn_config.rope_theta</c> is not read there. The router always works as in
/// eval: DbrxRouter's training-time input jitter (<c>moe_jitter_eps</c>) is not reproduced, nor are the
/// attn_pdrop / resid_pdrop dropouts.
/// </para>
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
            Runtime = Runtime(c, attn, ffn, vocab, hidden, layers, heads, kv, headDim, experts, topK, inter, actName),
        };
    }

    /// <summary>
    /// Pre-norm blocks with bias-free LayerNorms (torch's default eps 1e-5): norm_1, attention and norm_2 nest in
    /// <c>norm_attn_norm</c>, the MoE is <c>ffn</c>; the model is <c>transformer.{rotary_emb, wte, blocks, norm_f}</c>.
    /// </summary>
    private static DecoderRuntime Runtime(ModelConfig c, ModelConfig attn, ModelConfig ffn, long vocab, long hidden, long layers,
        long heads, long kv, long headDim, long experts, long topK, long inter, string act)
    {
        var norm = new NormSettings(NormKind.LayerNormNoBias, 1e-5);
        double? clip = attn.Has("clip_qkv") ? attn.Double("clip_qkv", 0) : null;
        double? normalize = ffn.IsExplicitNull("moe_normalize_expert_weights") ? null : ffn.Double("moe_normalize_expert_weights", 1.0);
        var attention = new FusedQkvAttentionSettings(heads, kv, headDim, clip);
        var moe = new StackedExpertsMoeSettings(experts, topK, inter, act, normalize);
        const string group = "norm_attn_norm";
        var form = new LayerForm([$"{group}.norm_1", $"{group}.attn", $"{group}.norm_2", "ffn"],
            new NamedNorm($"{group}.norm_1", norm), null, new NamedNorm($"{group}.norm_2", norm), null, AttentionName: $"{group}.attn");
        var all = Enumerable.Range(0, (int)layers).Select(_ => new DecoderLayerRuntime(attention, "ffn", moe, norm, norm, form)).ToList();
        return new DecoderRuntime(vocab, hidden, false, c.Double("initializer_range", 0.02), norm, RopeSettings.Read(c, 10000.0, headDim), all,
            Names: new ModelNames("wte", "norm_f", "rotary_emb", Root: "transformer", Layers: "blocks", RotaryFirst: true));
    }
}
