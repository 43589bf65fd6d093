using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// Mistral 4 (<c>mistral4</c>, the text model; AutoModelForCausalLM builds <c>Mistral4ForCausalLM</c>): DeepSeek-V2
/// MLA attention, the first <c>first_k_dense_replace</c> layers dense, the rest MoE with a softmax grouped TopK router
/// (no correction bias) and <c>n_shared_experts</c> shared experts fused into one MLP. Mistral 4 did not exist in
/// transformers 4.57 and save_pretrained writes the fused experts as they are (no conversion mapping), so
/// <see cref="Layout.V4"/>, the on-disk checkpoint layout, is the transformers-5 tree.
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

        var routing = Blocks.GroupedTopKRouting("softmax", false, c.IntOrNull("n_group", 1) ?? 1, c.IntOrNull("topk_group", 1) ?? 1,
            topK, experts, c.Bool("norm_topk_prob", true), c.Double("routed_scaling_factor", 1.0));
        var moe = new MoeFacts(experts, topK, shared, moeInter, sharedInter, moeLayers, denseLayers, routing);
        return Blocks.Spec(c, "mistral4", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            RuntimeUnavailable = "runtime settings not declared yet: no transformers reference for its MLA to check them against",
        };
    }
}
