using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Mistral 4 (<c>mistral4</c>, the text model; AutoModelForCausalLM builds <c>Mistral4ForCausalLM</c>): DeepSeek-V2
/// MLA attention, the first <c>first_k_dense_replace</c> layers dense, the rest MoE with a softmax grouped TopK router
/// (no correction bias) and <c>n_shared_experts</c> shared experts fused into one MLP. Mistral 4 did not exist in
/// transformers 4.57 and save_pretrained writes the fused experts as they are (no conversion mapping), so
/// <see cref="Layout.V4"/>, the on-disk checkpoint layout, is the transformers-5 tree.
/// Runtime: checked against a transformers fixture (tests' Data/hf-moe/mistral4). Read from
/// transformers 5.17's modeling_mistral4.py: Mistral4Attention is DeepSeek-V3's MLA (rope_interleave, yarn_apply_mscale
/// scaling) plus get_llama_4_attn_scale on the query; Mistral4TopkRouter is a softmax router in the model's dtype,
/// groups scored by their best two, other groups zeroed, weights gathered from the scores, renormalised under
/// norm_topk_prob, times routed_scaling_factor; the shared experts are always added.
/// </summary>
internal sealed class Mistral4Family : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["mistral4"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: Mistral4Config (5.17).
        var vocab = c.Positive("vocab_size", 131072);
        var hidden = c.Positive("hidden_size", 4096);
        var inter = c.Positive("intermediate_size", 12288);
        var moeInter = c.Positive("moe_intermediate_size", 2048);
        var layers = c.Positive("num_hidden_layers", 36);
        var heads = c.Positive("num_attention_heads", 32);
        var kv = c.IntOrNull("num_key_value_heads", 32) ?? heads;
        var experts = c.FirstInt("n_routed_experts", "num_local_experts") ?? 128;
        var shared = c.Int("n_shared_experts", 1);
        var topK = c.Positive("num_experts_per_tok", 4);
        var firstDense = c.Int("first_k_dense_replace", 0);
        var mla = Blocks.MlaShape.Read(c, heads, 1024, 256, 64, 64, 128);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var sharedInter = moeInter * shared;

        var (moeLayers, denseLayers) = Blocks.SplitLayers(layers, i => i >= firstDense);
        var moeSet = moeLayers.ToHashSet();
        // The fused experts are also the checkpoint's layout.
        var built = Layout.V5;

        var b = new TreeBuilder("Mistral4ForCausalLM", layout);
        Blocks.CausalLm(b, "Mistral4", vocab, hidden, layers, tie, i =>
        {
            Blocks.Mla(b, "Mistral4Attention", "Mistral4RMSNorm", hidden, mla);
            if (moeSet.Contains(i))
                Blocks.SharedExpertMoe(b, built, "Mistral4", "Mistral4MoE", experts, hidden, moeInter, sharedInter, actClass, Blocks.ScoreBias.None);
            else
                Blocks.GatedMlp(b, "mlp", "Mistral4MLP", hidden, inter, false, actClass, ModuleLocation.Mlp);
            b.RmsNorm("input_layernorm", "Mistral4RMSNorm", hidden, ModuleLocation.Norm);
            b.RmsNorm("post_attention_layernorm", "Mistral4RMSNorm", hidden, ModuleLocation.Norm);
        });

        var groups = c.IntOrNull("n_group", 1) ?? 1;
        var topKGroups = c.IntOrNull("topk_group", 1) ?? 1;
        var normTopK = c.Bool("norm_topk_prob", true);
        var scale = c.Double("routed_scaling_factor", 1.0);
        var routing = Blocks.GroupedTopKRouting("softmax", false, groups, topKGroups, topK, experts, normTopK, scale);
        var moe = new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers, routing);
        var spec = Blocks.Spec(c, "mistral4", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        // Mistral4RotaryEmbedding: the default rope rotates head_dim dims, the others (yarn) head_dim ·
        // partial_rotary_factor; transformers' forward fails unless that is qk_rope_head_dim, so the runtime refuses.
        var ropeType = RopeSettings.Read(c, 10000.0, mla.RopeDim).Type;
        var headDim = c.IntOrNull("head_dim", mla.QkHeadDim) ?? mla.QkHeadDim;
        var ropeDim = ropeType == "default" ? headDim : (long)(headDim * RopeSettings.PartialRotaryFactor(c, 1.0));
        if (ropeDim != mla.RopeDim)
            return spec with { RuntimeUnavailable = $"a rotary width ({ropeDim}) other than qk_rope_head_dim ({mla.RopeDim})" };
        var rope = RopeSettings.Read(c, 10000.0, ropeDim);
        var ropeParams = c.Sub("rope_parameters") ?? c.Sub("rope_scaling");
        if (ropeParams is null || !ropeParams.Has("llama_4_scaling_beta") || !ropeParams.Has("original_max_position_embeddings"))
            return spec with { RuntimeUnavailable = "rope_parameters without llama_4_scaling_beta and original_max_position_embeddings (Mistral4Attention's query scale needs both)" };
        if (groups <= 0 || experts % groups != 0 || topKGroups <= 0 || topKGroups > groups || experts / groups < 2)
            return spec with { RuntimeUnavailable = $"n_group {groups} / topk_group {topKGroups} that do not split {experts} experts into groups of two or more" };
        var queryScale = new Llama4QueryScale(ropeParams.Double("llama_4_scaling_beta", 0), ropeParams.Double("original_max_position_embeddings", 0));
        // q_a_layernorm and kv_a_layernorm are built without eps: Mistral4RMSNorm's 1e-6.
        var attention = new MlaAttentionSettings(heads, mla.QLoraRank, mla.KvLoraRank, mla.NopeDim, mla.RopeDim, mla.VHeadDim, mla.Bias,
            c.Bool("rope_interleave", true), rope.MlaSoftmaxScale(mla.QkHeadDim), LowRankNormEps: 1e-6, QueryScale: queryScale);
        var sparse = new MoeSettings(
            new SoftmaxGroupLimitedRouterSettings("gate", experts, topK, groups, topKGroups, GroupScore.TopTwoSum,
                WeightsFromScores: true, normTopK, scale, InFp32: false),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, moeInter, act),
            new SharedExpertSettings("shared_experts", sharedInter, act, SigmoidGateName: null), MoeOrder.ExpertsFirst);
        var dense = new GatedMlpSettings(inter, act);
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6));
        var runtimeLayers = Enumerable.Range(0, (int)layers)
            .Select(i => new DecoderLayerRuntime(attention, "mlp", moeSet.Contains(i) ? sparse : dense, norm, norm)).ToList();
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, rope, runtimeLayers),
        };
    }
}
