using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>
/// MiniMax-Text-01 (<c>minimax</c>) and MiniMax-M2 (<c>minimax_m2</c>), both derived from Mixtral: every layer MoE,
/// fused experts of <c>intermediate_size</c> under <c>mlp</c> in transformers 5, per-expert <c>w1/w2/w3</c> under
/// <c>block_sparse_moe</c> on disk (transformers' conversion mapping).
/// <para>
/// minimax is a hybrid: <c>layer_types</c> (default: even layers full attention, odd layers
/// <c>linear_attention</c>) picks softmax attention or MiniMaxLightningAttention (act_fn, an RMSNorm over
/// heads·head_dim, qkv_proj, out_proj, output_gate; its decay tables are persistent buffers, not parameters). The
/// decoder layer registers self_attn, the norms, then mlp. Layout.V4 is 4.57's tree (Mixtral's order: self_attn,
/// block_sparse_moe with an nn.Linear gate, then the norms). The Torch runtime runs both attentions (lightning
/// attention block by block, as MiniMaxLightningAttention's forward without cache) and MiniMax's residuals taken after
/// the norms with their alpha / beta factors.
/// </para>
/// <para>
/// minimax_m2 is new in transformers 5: Layout.V4 means the on-disk checkpoint layout (v5 module classes, the
/// TopK router kept, experts as a per-expert ModuleList). Its attention normalises q and k over all heads at once
/// (q_norm [heads·head_dim], k_norm [kv_heads·head_dim]); routing is sigmoid with a persistent
/// <c>e_score_correction_bias</c> buffer on the MoE block.
/// </para>
/// </summary>
internal sealed class MiniMaxFamily : IArchitecture
{
    public IReadOnlyList<string> ModelTypes => ["minimax", "minimax_m2"];

    public ModelSpec Build(ModelConfig c, Layout layout)
    {
        var type = c.ModelType!;
        var m2 = type == "minimax_m2";
        var p = m2 ? "MiniMaxM2" : "MiniMax";
        // Defaults: MiniMaxConfig / MiniMaxM2Config.
        var vocab = c.Positive("vocab_size", m2 ? 200064 : 32000);
        var hidden = c.Positive("hidden_size", m2 ? 3072 : 4096);
        var inter = c.Positive("intermediate_size", m2 ? 1536 : 14336);
        var layers = c.Positive("num_hidden_layers", m2 ? 62 : 32);
        var heads = c.Positive("num_attention_heads", m2 ? 48 : 32);
        var kv = c.IntOrNull("num_key_value_heads", 8) ?? heads;
        // MiniMax: head_dim or hidden // heads; M2: getattr(config, "head_dim", ...) with a class default of 128.
        var headDim = m2 ? c.Positive("head_dim", 128) : Blocks.HeadDim(c, hidden, heads);
        var experts = c.FirstInt("num_local_experts", "num_experts") ?? (m2 ? 256 : 8); // num_experts: attribute_map alias
        var topK = c.Positive("num_experts_per_tok", m2 ? 8 : 2);
        var tie = c.Bool("tie_word_embeddings", false);
        var act = c.String("hidden_act", "silu")!;
        var actClass = Blocks.ActivationClass(act, layout);
        var layerTypes = m2 ? null : c.StringList("layer_types")
            ?? Enumerable.Range(0, (int)layers).Select(i => (i + 1) % 2 != 0 ? "full_attention" : "linear_attention").ToList();
        if (layerTypes is not null && layerTypes.Count < layers)
            throw new ConfigException($"config field 'layer_types' has {layerTypes.Count} entries but num_hidden_layers is {layers}");
        var v5 = layout == Layout.V5;
        var blockSize = m2 ? 0 : c.Positive("block_size", 256);

        var b = new TreeBuilder(p + "ForCausalLM", layout);
        Blocks.CausalLm(b, p, vocab, hidden, layers, tie, i =>
        {
            if (layerTypes is not null && layerTypes[i] == "linear_attention")
            {
                using (b.Scope("self_attn", "MiniMaxLightningAttention", ModuleLocation.Attention))
                {
                    b.Leaf("act_fn", actClass);
                    b.RmsNorm("norm", "MiniMaxRMSNorm", heads * headDim);
                    b.Linear("qkv_proj", hidden, 3 * heads * headDim);
                    b.Linear("out_proj", heads * headDim, hidden);
                    b.Linear("output_gate", hidden, heads * headDim);
                    // Persistent buffers (saved with the checkpoint): per-head slope rates and the decay tables of one block.
                    b.Buffer("slope_rate", heads, 1, 1);
                    b.Buffer("query_decay", heads, blockSize, 1);
                    b.Buffer("key_decay", heads, blockSize, 1);
                    b.Buffer("diagonal_decay", 1, heads, blockSize, blockSize);
                }
            }
            else
            {
                Blocks.Attention(b, p + "Attention", hidden, heads, kv, headDim, false, false, afterProjections: m2
                    ? bb =>
                    {
                        bb.RmsNorm("q_norm", p + "RMSNorm", heads * headDim);
                        bb.RmsNorm("k_norm", p + "RMSNorm", kv * headDim);
                    }
                    : null);
            }
            // 5.17 MiniMax registers the norms before mlp; M2 and 4.57 MiniMax (Mixtral's order) after it.
            var normsFirst = !m2 && v5;
            if (normsFirst) Norms(b, p, hidden);
            using (b.Scope(v5 ? "mlp" : "block_sparse_moe", p + "SparseMoeBlock", ModuleLocation.Other))
            {
                if (m2) Blocks.TopKRouter(b, "gate", p + "TopKRouter", experts, hidden);
                // M2's selection bias: a persistent buffer of the block (in the checkpoint, not a parameter).
                if (m2) b.Buffer("e_score_correction_bias", experts);
                else Blocks.Router(b, layout, "gate", p + "TopKRouter", experts, hidden);
                Blocks.Experts(b, layout, p, experts, hidden, inter, actClass, Blocks.ExpertNames.Mixtral,
                    expertClass: m2 ? null : "MiniMaxBlockSparseTop2MLP");
            }
            if (!normsFirst) Norms(b, p, hidden);
        });

        var all = Enumerable.Range(0, (int)layers).ToList();
        var routing = m2
            ? $"sigmoid of {experts} router logits; top-{topK} chosen on sigmoid + e_score_correction_bias, their sigmoids renormalised"
            : $"softmax over {experts} experts, top-{topK}, renormalised";
        var moe = new MoeFacts(experts, topK, 0, inter, 0, all, [], routing);
        var spec = Blocks.Spec(c, type, b.Build(), moe, hidden, layers, vocab, heads, kv, tie, act);
        if (!m2) return spec with { Runtime = TextRuntime(c, vocab, hidden, layers, heads, kv, headDim, tie, act, experts, topK, inter, blockSize, layerTypes!) };

        // M2: pre-norm; q_norm / k_norm over all heads at once before the head split; partial rotary from
        // rope_parameters.partial_rotary_factor; sigmoid router, selection on sigmoid + the block's
        // e_score_correction_bias buffer, weights renormalised (no epsilon, no scale).
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-6));
        var rotary = (long)(headDim * RopeSettings.PartialRotaryFactor(c, 1.0));
        var layer = new DecoderLayerRuntime(
            new StandardAttentionSettings(heads, kv, headDim, false, false, QkNormKind.Full, norm.Eps, Sinks: false, MaskSettings.Full, rotary),
            "mlp",
            new MoeSettings(new SigmoidBiasRouterSettings("gate", experts, topK, new ScoreBias("e_score_correction_bias", ScoreBiasOwner.Block, IsParameter: false),
                    NormTopK: true, NormEps: 0, Scale: 1.0, SoftCap: 0),
                new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, inter, act), Shared: null, MoeOrder.RouterFirst),
            norm, norm);
        return spec with
        {
            Runtime = new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, RopeSettings.Read(c, 5000000.0, rotary),
                Enumerable.Repeat(layer, (int)layers).ToList()),
        };
    }

    // MiniMax-Text-01 (MiniMaxDecoderLayer): the residual of each sublayer is its norm's output, weighted by the
    // config's alpha (residual) and beta (sublayer) factors; softmax attention (Mixtral's, sliding when the config
    // says so) or lightning attention per layer_types; Mixtral's softmax top-k router, renormalised.
    private static DecoderRuntime TextRuntime(ModelConfig c, long vocab, long hidden, long layers, long heads, long kv, long headDim, bool tie,
        string act, long experts, long topK, long inter, long blockSize, IReadOnlyList<string> layerTypes)
    {
        var norm = new NormSettings(NormKind.Rms, c.Double("rms_norm_eps", 1e-5));
        var window = c.IntOrNull("sliding_window", null) ?? 0;
        var full = new StandardAttentionSettings(heads, kv, headDim, false, false, QkNormKind.None, norm.Eps, Sinks: false,
            window > 0 ? new MaskSettings(MaskKind.Sliding, window) : MaskSettings.Full, RotaryDim: headDim);
        var moe = new MoeSettings(new SoftmaxTopKRouterSettings("gate", experts, topK, NormTopK: true),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, inter, act), Shared: null, MoeOrder.RouterFirst);
        var mlp = new NormedResiduals(1, 1, c.Double("mlp_alpha_factor", 1), c.Double("mlp_beta_factor", 1));
        var runtimeLayers = Enumerable.Range(0, (int)layers).Select(i =>
        {
            var linear = layerTypes[i] == "linear_attention";
            AttentionSettings attention = linear ? new LightningAttentionSettings(heads, headDim, blockSize, act, i, layers) : full;
            var prefix = linear ? "linear_attn" : "full_attn";
            var residuals = mlp with { AttentionAlpha = c.Double(prefix + "_alpha_factor", 1), AttentionBeta = c.Double(prefix + "_beta_factor", 1) };
            var form = new LayerForm(["self_attn", "input_layernorm", "post_attention_layernorm", "mlp"],
                new NamedNorm("input_layernorm", norm), null, new NamedNorm("post_attention_layernorm", norm), null, NormedResiduals: residuals);
            return new DecoderLayerRuntime(attention, "mlp", moe, norm, norm, form);
        }).ToList();
        return new DecoderRuntime(vocab, hidden, tie, c.Double("initializer_range", 0.02), norm, RopeSettings.Read(c, 1000000.0, headDim), runtimeLayers);
    }

    private static void Norms(TreeBuilder b, string p, long hidden)
    {
        b.RmsNorm("input_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
        b.RmsNorm("post_attention_layernorm", p + "RMSNorm", hidden, ModuleLocation.Norm);
    }
}
