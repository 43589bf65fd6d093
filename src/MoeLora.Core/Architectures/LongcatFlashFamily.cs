using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// LongCat-Flash (<c>longcat_flash</c>): <c>num_layers</c> decoder layers, each with two MLA sublayers
/// (<c>self_attn.0/1</c>), two dense MLPs (<c>mlps.0/1</c>, <c>ffn_hidden_size</c>), paired norms, and one shortcut MoE
/// (<c>mlp</c>). The MoE has <c>n_routed_experts</c> real experts plus <c>zero_expert_num</c> identity ("zero
/// computation") experts: the router (a module holding the <c>classifier</c> nn.Linear over all E + Z, and the
/// persistent <c>e_score_correction_bias</c>) picks top-<c>moe_topk</c> of E + Z; gate_up_proj is sized for E + Z,
/// down_proj for E. LongCat did not exist in transformers 4.57: <see cref="Layout.V4"/> means the on-disk checkpoint
/// layout as save_pretrained writes it: <c>experts.{e}.gate_proj/up_proj</c> for every e &lt; E + Z, down_proj only for
/// e &lt; E (a ModuleList of LongcatFlashMLP).
/// </summary>
internal sealed class LongcatFlashFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["longcat_flash"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        // Defaults: LongcatFlashConfig (5.17); intermediate_size and num_experts_per_tok are attribute_map aliases.
        var vocab = c.Positive("vocab_size", 131072);
        var hidden = c.Positive("hidden_size", 6144);
        var layers = c.Positive("num_layers", 28);
        var heads = c.Positive("num_attention_heads", 64);
        var kv = c.IntOrNull("num_key_value_heads", heads) ?? heads;
        var ffn = c.FirstInt("ffn_hidden_size", "intermediate_size") ?? 12288;
        var expertInter = c.Positive("expert_ffn_hidden_size", 2048);
        var experts = c.FirstInt("n_routed_experts", "num_local_experts") ?? 512;
        var zero = c.IntOrNull("zero_expert_num", 256) ?? 0;
        var topK = c.FirstInt("moe_topk", "num_experts_per_tok") ?? 12;
        var routerBias = c.Bool("router_bias", false);
        var mla = Blocks.MlaShape.Read(c, heads, 1536, 512, 128, 64, 128);
        if (mla.QLoraRank is null)
            throw new ConfigException("config field 'q_lora_rank' must be set: LongcatFlashMLA scales by hidden_size / q_lora_rank");
        mla = mla with { QkHeadDim = c.IntOrNull("qk_head_dim", null) ?? mla.NopeDim + mla.RopeDim };
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var total = experts + zero;

        var b = new TreeBuilder("LongcatFlashForCausalLM", layout);
        Blocks.CausalLm(b, "LongcatFlash", vocab, hidden, layers, tie, i =>
        {
            using (b.Scope("mlp", "LongcatFlashMoE", ModuleLocation.Other))
            {
                if (layout == Layout.V5)
                {
                    using (b.Scope("experts", "LongcatFlashExperts", ModuleLocation.RoutedExpert, kind: ModuleKind.Experts, numExperts: experts))
                    {
                        if (experts > 0)
                        {
                            b.Param("gate_up_proj", total, 2 * expertInter, hidden);
                            b.Param("down_proj", experts, hidden, expertInter);
                        }
                        b.Leaf("act_fn", actClass);
                        b.Leaf("identity_expert", "Identity");
                    }
                }
                else
                {
                    PerExpertCheckpoint(b, experts, total, hidden, expertInter, actClass);
                }
                using (b.Scope("router", "LongcatFlashTopkRouter", ModuleLocation.Router))
                {
                    b.Buffer("e_score_correction_bias", total);
                    b.Linear("classifier", hidden, total, routerBias);
                }
            }
            b.ModuleList("self_attn", 2, j => Blocks.Mla(b, "LongcatFlashMLA", "LongcatFlashRMSNorm", hidden, mla, name: Index(j)));
            b.ModuleList("mlps", 2, j => Blocks.GatedMlp(b, Index(j), "LongcatFlashMLP", hidden, ffn, false, actClass, ModuleLocation.Mlp));
            b.ModuleList("input_layernorm", 2, j => b.RmsNorm(Index(j), "LongcatFlashRMSNorm", hidden, ModuleLocation.Norm));
            b.ModuleList("post_attention_layernorm", 2, j => b.RmsNorm(Index(j), "LongcatFlashRMSNorm", hidden, ModuleLocation.Norm));
        });

        var routing = $"softmax over {total} experts ({experts} real + {zero} identity), top-{topK} picked on scores + " +
            $"e_score_correction_bias, not renormalised, scaled by " +
            c.Double("routed_scaling_factor", 6.0).ToString(System.Globalization.CultureInfo.InvariantCulture);
        var moe = new MoeFacts(experts, topK, 0, expertInter, 0, Enumerable.Range(0, (int)layers).ToList(), [], routing);
        return Blocks.Spec(c, "longcat_flash", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act) with
        {
            RuntimeUnavailable = "LongCat-Flash's two-sublayer blocks and zero-computation experts",
        };
    }

    private static string Index(int j) => j.ToString(System.Globalization.CultureInfo.InvariantCulture);

    /// <summary>What save_pretrained writes for the fused experts: gate/up for all E + Z slices, down for the E real ones.</summary>
    private static void PerExpertCheckpoint(TreeBuilder b, long experts, long total, long hidden, long inter, string actClass)
    {
        using (b.Scope("experts", "ModuleList", ModuleLocation.RoutedExpert))
        {
            for (var e = 0; e < (experts > 0 ? total : 0); e++)
            {
                using (b.Scope(Index(e), "LongcatFlashMLP"))
                {
                    b.Linear("gate_proj", hidden, inter);
                    b.Linear("up_proj", hidden, inter);
                    if (e < experts) b.Linear("down_proj", inter, hidden);
                    b.Leaf("act_fn", actClass);
                }
            }
        }
    }
}
