using MoeLora.Core.Architectures;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Torch.Nn;

namespace MoeLora.Torch.Models;

/// <summary>
/// Builds the runtime model from Core's <see cref="ModelSpec.Runtime"/> alone: each settings record maps to one Nn
/// block (never a model_type), so a family with standard blocks needs no code here. Parameters are registered in
/// transformers' order, so <c>named_parameters()</c> equals the spec's <c>Layout.V5</c> tree (tested for every tiny
/// config the repository holds).
/// </summary>
public static class ModelBuilder
{
    /// <summary>The model of <paramref name="spec"/>; a spec without runtime settings is refused in one line.</summary>
    public static CausalLm Build(ModelSpec spec, Init init)
    {
        var runtime = spec.RequireRuntime();
        var rope = Rotary.FromSettings(runtime.Rope);
        // Layers with a rope of their own (per-layer-type tables) share one table per distinct setting.
        var layerRopes = new Dictionary<RopeSettings, Rotary>();
        Rotary RopeOf(AttentionSettings a) => (a switch { StandardAttentionSettings { Options.Rope: { } o } => o, CcaAttentionSettings c => c.Rope,
            DeepseekV4AttentionSettings d => d.Rope, _ => null }) is { } own
            ? layerRopes.TryGetValue(own, out var r) ? r : layerRopes[own] = Rotary.FromSettings(own)
            : rope;
        long hidden = runtime.HiddenSize;
        return new CausalLm(spec, runtime, init, i =>
        {
            var l = runtime.Layers[i];
            if (runtime.HyperConnections is { } hc)
            {
                if (l.Form is not null || l.Shortcut is not null) throw new NotSupportedException("hyper-connections run only pre-norm layers.");
                return new HyperConnectionDecoderLayer(Attention(hidden, l.Attention, RopeOf(l.Attention), init) ?? throw OneSublayer(), l.FeedForwardName,
                    FeedForward(hidden, l.FeedForward, init) ?? throw OneSublayer(), new RmsNorm(hidden, l.InputNorm, init),
                    new RmsNorm(hidden, l.PostAttentionNorm, init), hc, hidden, init);
            }
            if (l.Shortcut is { } sc)
                return new ShortcutMoeDecoderLayer(l.FeedForwardName, FeedForward(hidden, l.FeedForward, init) ?? throw OneSublayer(),
                    () => Attention(hidden, l.Attention, RopeOf(l.Attention), init) ?? throw OneSublayer(),
                    () => FeedForward(hidden, sc.DenseMlp, init) ?? throw OneSublayer(), sc, l.InputNorm, l.PostAttentionNorm, hidden, init);
            if (l.Convs is { } convs)
                return new InklingDecoderLayer(Attention(hidden, l.Attention, RopeOf(l.Attention), init) ?? throw OneSublayer(), l.FeedForwardName,
                    FeedForward(hidden, l.FeedForward, init) ?? throw OneSublayer(), new RmsNorm(hidden, l.InputNorm, init),
                    new RmsNorm(hidden, l.PostAttentionNorm, init), convs, hidden, init);
            if ((l.Form ?? PreNormForm(l)) is { } form)
                return new FormDecoderLayer(Attention(hidden, l.Attention, RopeOf(l.Attention), init), l.FeedForwardName, FeedForward(hidden, l.FeedForward, init), form,
                    form.ExtraFeedForward is { } extra ? FeedForward(hidden, extra, init) ?? throw OneSublayer() : null, hidden, init);
            return new DecoderLayer(Attention(hidden, l.Attention, RopeOf(l.Attention), init) ?? throw OneSublayer(), l.FeedForwardName,
                FeedForward(hidden, l.FeedForward, init) ?? throw OneSublayer(), new RmsNorm(hidden, l.InputNorm, init), new RmsNorm(hidden, l.PostAttentionNorm, init));
        });
    }

    // The default pre-norm layer with LayerNorms (PhiMoE) runs as the equivalent form (DecoderLayer holds RMSNorms).
    static LayerForm? PreNormForm(DecoderLayerRuntime l) =>
        l.InputNorm.Kind is NormKind.Rms or NormKind.RmsWeightInFp32 && l.PostAttentionNorm.Kind is NormKind.Rms or NormKind.RmsWeightInFp32 ? null
            : new LayerForm(["self_attn", l.FeedForwardName, "input_layernorm", "post_attention_layernorm"],
                new NamedNorm("input_layernorm", l.InputNorm), null, new NamedNorm("post_attention_layernorm", l.PostAttentionNorm), null);

    static NotSupportedException OneSublayer() => new("a layer with only one of attention and feed-forward needs a LayerForm.");

    // Null for a layer without that sublayer (Nemotron-H's one-mixer blocks).
    static HfModule? Attention(long hidden, AttentionSettings a, Rotary rope, Init init) => a switch
    {
        NoAttentionSettings => null,
        ShortConvSettings s => new ShortConv(hidden, s, init),
        Mamba2MixerSettings s => new Mamba2Mixer(hidden, s, init),
        MambaMixerSettings s => new MambaMixer(hidden, s, init),
        StandardAttentionSettings s => new StandardAttention(hidden, s, rope, init),
        MlaAttentionSettings s => new MlaAttention(hidden, s, rope, init),
        Llama4AttentionSettings s => new Llama4Attention(hidden, s, rope, init),
        DynamicMaskAttentionSettings s => new DynamicMaskAttention(hidden, s, rope, init),
        CcaAttentionSettings s => new CcaAttention(hidden, s, rope, init),
        GatedDeltaNetSettings s => new GatedDeltaNet(hidden, s, init),
        KimiDeltaAttentionSettings s => new KimiDeltaAttention(hidden, s, init),
        LightningAttentionSettings s => new LightningAttention(hidden, s, init),
        MixtureOfAttentionHeadsSettings s => new JetMoeAttention(hidden, s, rope, init),
        FusedQkvAttentionSettings s => new FusedQkvAttention(hidden, s, rope, init),
        InklingAttentionSettings s => new InklingAttention(hidden, s, init),
        DeepseekV4AttentionSettings s => new DeepseekV4Attention(hidden, s, rope, init),
        _ => throw new NotSupportedException($"attention settings {a.GetType().Name} have no runtime block."),
    };

    static HfModule? FeedForward(long hidden, FeedForwardSettings f, Init init) => f switch
    {
        NoFeedForwardSettings => null,
        NonGatedMlpSettings m => new NonGatedMlp(hidden, m, init),
        NonGatedMoeSettings m => new NonGatedMoe(hidden, m, init),
        GatedMlpSettings m => new GatedMlp(hidden, m, init),
        FusedGateUpMlpSettings m => new FusedGateUpMlp(hidden, m, init),
        ParallelExpertsMoeSettings m => new JetMoeMoe(hidden, m, init),
        StackedExpertsMoeSettings m => new StackedExpertsMoe(hidden, m, init),
        InklingMoeSettings m => new InklingMoe(hidden, m, init),
        ModalityIsolatedMoeSettings m => new ModalityIsolatedMoe(hidden, m, init),
        MoeSettings m => m.Router switch
        {
            SoftmaxTopKRouterSettings { LinearModule: true } => new RoutedMoe(hidden, Expect(m, ExpertsLayout.GateUpOutIn), init),
            SoftmaxTopKRouterSettings => new SoftmaxTopKMoe(hidden, Expect(m, ExpertsLayout.GateUpOutIn), init),
            SigmoidGroupLimitedRouterSettings => new SigmoidGroupLimitedMoe(hidden,
                m.Experts.Layout == ExpertsLayout.GateUpOutInClamped ? m : Expect(m, ExpertsLayout.GateUpOutIn), init),
            SoftmaxGroupLimitedRouterSettings => new SoftmaxGroupLimitedMoe(hidden, Expect(m, ExpertsLayout.GateUpOutIn), init),
            TopKSoftmaxRouterSettings => new GptOssMlp(hidden, Expect(m, ExpertsLayout.GptOssInterleaved), init),
            Llama4RouterSettings => new Llama4Moe(hidden, Expect(m, ExpertsLayout.Llama4InOut), init),
            MlpRouterSettings => new MlpRouterMoe(hidden, Expect(m, ExpertsLayout.GateUpOutIn), init),
            ScoreFunctionRouterSettings => new RoutedMoe(hidden, Expect(m, ExpertsLayout.GateUpOutInClamped), init),
            TopKLogitsRouterSettings or SigmoidBiasRouterSettings or SparseMixerRouterSettings
                or SoftmaxStaticsTopKRouterSettings or LinearSoftmaxTopKRouterSettings or SoftmaxBiasRouterSettings => new RoutedMoe(hidden, m, init),
            _ => throw new NotSupportedException($"router settings {m.Router.GetType().Name} have no runtime block."),
        },
        _ => throw new NotSupportedException($"feed-forward settings {f.GetType().Name} have no runtime block."),
    };

    // Each router's block runs one experts layout; another combination needs a block of its own.
    static MoeSettings Expect(MoeSettings m, ExpertsLayout layout) => m.Experts.Layout == layout ? m
        : throw new NotSupportedException($"{m.Router.GetType().Name} with {m.Experts.Layout} experts has no runtime block.");
}
