using MoeLora.Core.Architectures.Runtime;
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
/// <para>
/// Runtime (checked against a transformers fixture): <see cref="ShortcutMoeForm"/> for the layer, MLA with
/// <c>apply_rotary_pos_emb_interleave</c> and the constant query / kv-latent scales (<see cref="MlaLatentScale"/>),
/// <see cref="SoftmaxBiasRouterSettings"/> and fused experts with <see cref="ExpertsSettings.ZeroExperts"/>. Configs
/// transformers' forward cannot run (a rotary width other than qk_rope_head_dim, qk_head_dim other than nope + rope,
/// fewer kv heads than heads, no routed experts, top-k beyond E + Z) are refused, naming why.
/// </para>
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
        var spec = Blocks.Spec(c, "longcat_flash", b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);

        // LongcatFlashRotaryEmbedding rotates head_dim dims (head_dim or hidden / heads); apply_rotary_pos_emb_interleave
        // needs them to be the qk_rope_head_dim dims it rotates.
        var ropeDim = c.IntOrNull("head_dim", 64) ?? hidden / heads;
        var unavailable =
            ropeDim != mla.RopeDim ? $"a rotary width (head_dim {ropeDim}) other than qk_rope_head_dim ({mla.RopeDim})"
            : mla.QkHeadDim != mla.NopeDim + mla.RopeDim ? $"qk_head_dim {mla.QkHeadDim} other than qk_nope_head_dim + qk_rope_head_dim ({mla.NopeDim + mla.RopeDim})"
            : kv != heads ? $"num_key_value_heads {kv} other than num_attention_heads {heads} (LongcatFlashMLA repeats its per-head keys)"
            : experts == 0 ? "LongCat-Flash without routed experts"
            : topK > total ? $"LongCat-Flash choosing {topK} of {total} experts"
            : null;
        if (unavailable is not null) return spec with { RuntimeUnavailable = unavailable };

        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-5));
        var rope = RopeSettings.Read(c, 1e7, ropeDim);
        // q_a_layernorm / kv_a_layernorm are built without eps: LongcatFlashRMSNorm's 1e-6.
        var attention = new MlaAttentionSettings(heads, mla.QLoraRank, mla.KvLoraRank, mla.NopeDim, mla.RopeDim, mla.VHeadDim, mla.Bias,
            RopeInterleave: true, rope.MlaSoftmaxScale(mla.QkHeadDim), LowRankNormEps: 1e-6,
            LatentScale: new MlaLatentScale(Math.Sqrt((double)hidden / mla.QLoraRank!.Value), Math.Sqrt((double)hidden / mla.KvLoraRank)));
        var router = new SoftmaxBiasRouterSettings("router", "classifier", total, topK, c.Double("routed_scaling_factor", 6.0), routerBias);
        var shortcutMoe = new MoeSettings(router, new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, expertInter, act, ZeroExperts: zero),
            Shared: null, MoeOrder.ExpertsFirst);
        var form = new ShortcutMoeForm(new GatedMlpSettings(ffn, act));
        var runtimeLayers = Enumerable.Range(0, (int)layers)
            .Select(_ => new DecoderLayerRuntime(attention, "mlp", shortcutMoe, norm, norm, Shortcut: form)).ToList();
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, rope, runtimeLayers),
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
