using MoeLora.Core.Architectures;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Core.Memory;

/// <summary>
/// Bytes that autograd keeps for backward in one decoder layer when the frozen base runs under LoRA, split into a
/// per-token part and a per-layer constant. Counted tensor by tensor from what the transformers 5 modeling code and
/// PEFT 0.21 do, using PyTorch's rule that an op saves an input only when the gradient of another input needs it
/// (a frozen nn.Linear keeps its weight, not its input):
/// <list type="bullet">
/// <item>RMSNorm: <c>hidden.to(float32)</c> is kept by <c>pow</c>/<c>mul</c>: 4 B × width (q_norm/k_norm: × q/k width).</item>
/// <item>Attention, sdpa/flash: q (after RoPE), k, v and the output, a B each (GQA: k/v are not repeated). MoeLora's
/// runtime, under a padding mask, calls SDPA with k/v repeated to all heads (CUDA's masked kernel has no grouped-query
/// support), so k and v are as wide as q and o's input, plus the fp32 log-sum-exp (4 B per head); that is the figure
/// here. An unpadded batch takes the causal path with enable_gqa and keeps k/v at their own width, so there the
/// prediction is high by a·(q − k + o − v) bytes per token and layer. Eager: q, k and v repeated to all heads, plus the
/// scores: the fp32 softmax output and its cast (4 + a B per score; gpt-oss keeps its sink softmax in the compute
/// dtype: a B per score), heads × S scores per token. Which one a layer runs: <see cref="EffectiveAttention"/>.</item>
/// <item>Gated MLP: gate output (SiLU input), SiLU output and up output, a B × I each (3·a·I).</item>
/// <item>Routed experts (per routed token, T·k of them): the gate_up output (2I, gate/up are views of it), the
/// activation output (I) and the expert output that the routing weight multiplies (H): a·(3I + H). gpt-oss's
/// clamped SwiGLU keeps gate_up (clamp's input), the clamped gate, the sigmoid, the GLU and up+1: a·(6I + H).</item>
/// <item>Router: the fp32 softmax over E experts and top-k indices: 4E + 12k B per token.</item>
/// <item>LoRA on an nn.Linear: PEFT casts the input to the adapter dtype (<c>_cast_input_dtype</c>, fp32) before
/// <c>lora_A</c>, which keeps it: 4 B × in_features, per adapter (q, k and v each cast their own copy), plus the r-wide
/// <c>lora_A</c> output (4r); dropout &gt; 0 adds a 1-byte mask per input element. MoeLora's runtime, without dropout,
/// keeps the bf16 input itself instead (widening is exact, so the gradients are PEFT's): a B × in_features, counted per
/// adapter although adapters fed the same tensor (q, k, v) share it, plus 4r for the output buffer TorchSharp's custom
/// autograd node keeps.</item>
/// <item>LoRA on fused experts (<c>target_parameters</c>, PEFT's ParamWrapper): the per-expert delta
/// <c>B@A</c> is materialised as an E × in × out weight on every forward and the merged weight (a B per element) is
/// kept for backward, plus the grouped-matmul input (a B × in per routed token) for the weight gradient. The fp32
/// delta (4 B per element) is a transient on top.</item>
/// <item>LoRA on fused experts in MoeLora's runtime (<see cref="LoraRuntime.MoeLora"/>): no ΔW and no merged weight;
/// <c>bmm(x, Rᵀ)</c> keeps the expert input x (a B × in per routed pair, the same tensor PEFT's path keeps) and
/// <c>bmm(x·Rᵀ, Lᵀ)</c> keeps the r-wide product (a B × r per routed pair, <see cref="LowRankPerTokenBytes"/>).
/// The factors L, R themselves (E·(in+out)·r) are negligible.</item>
/// <item>MoeLora's runtime recomputes fused routed experts in backward (<c>ExpertRecompute</c>, see
/// <see cref="ExpertsRecomputed"/>): a layer keeps only the experts' input and the output buffer of its custom autograd
/// node (2·a·H per token) and the grouping (24 B per routed pair); everything above that the experts would keep, LoRA
/// inputs and low-rank products included,
/// is <see cref="RecomputePerTokenBytes"/>, alive only while backward runs that one layer's experts again. Rows padded
/// for the batched bmm (at most 4× the routed pairs on CUDA, 1.5× on the CPU) are not counted: with balanced routing
/// they are few.</item>
/// </list>
/// </summary>
public sealed record LayerActivations
{
    public required int Layer { get; init; }

    /// <summary>Saved bytes per token (batch × sequence position).</summary>
    public required long PerTokenBytes { get; init; }

    /// <summary>Saved bytes per token per key position (eager attention scores; multiply by tokens × S).</summary>
    public required long PerTokenPerKeyBytes { get; init; }

    /// <summary>Saved bytes per token of MoeLora's low-rank expert LoRA (the r-wide x·Rᵀ per routed pair); 0 under PEFT.</summary>
    public long LowRankPerTokenBytes { get; init; }

    /// <summary>
    /// Bytes per token of the routed experts' intermediates that MoeLora's runtime recomputes in backward instead of
    /// keeping: a transient of one layer at a time, not part of <see cref="Bytes"/>.
    /// </summary>
    public long RecomputePerTokenBytes { get; init; }

    /// <summary>Saved bytes independent of tokens (materialised fused-expert LoRA weights).</summary>
    public required long ConstantBytes { get; init; }

    /// <summary>Largest transient of the layer's forward (fp32 fused-expert delta before the cast).</summary>
    public required long TransientBytes { get; init; }

    /// <summary>Whether any tensor entering this layer requires grad (a LoRA adapter here or below).</summary>
    public required bool NeedsGrad { get; init; }

    public long Bytes(int batch, int seq) => NeedsGrad
        ? (PerTokenBytes + LowRankPerTokenBytes) * batch * seq + PerTokenPerKeyBytes * batch * (long)seq * seq + ConstantBytes
        : 0;

    /// <summary>The experts' recomputed intermediates while backward runs this layer (0 where nothing is recomputed).</summary>
    public long RecomputeBytes(long tokens) => NeedsGrad ? RecomputePerTokenBytes * tokens : 0;

    /// <summary>
    /// Whether MoeLora's runtime runs layer <paramref name="layer"/>'s routed experts through its recomputing autograd
    /// node: the fused 3-D experts (transformers-5 layout, Llama 4, gpt-oss, the clamped SwiGLU and the non-gated
    /// experts), not JetMoE's or DBRX's, not Aria's grouped GEMM.
    /// </summary>
    public static bool ExpertsRecomputed(ModelSpec spec, int layer) =>
        spec.Runtime is { } r && layer < r.Layers.Count && r.Layers[layer].FeedForward switch
        {
            MoeSettings m => m.Experts.Layout != ExpertsLayout.GroupedGemmInOut,
            ModalityIsolatedMoeSettings m => m.Text.Experts.Layout != ExpertsLayout.GroupedGemmInOut,
            NonGatedMoeSettings => true,
            _ => false,
        };

    // The planner's "what would fit" search re-estimates one plan many times with other batch/seq/GPU settings;
    // per-layer activations do not depend on those, so they are computed once per plan and setting.
    private static readonly System.Runtime.CompilerServices.ConditionalWeakTable<AdapterPlan,
        System.Collections.Concurrent.ConcurrentDictionary<(int, AttentionImpl, long, LoraRuntime), IReadOnlyList<LayerActivations>>> Cache = new();

    /// <summary>Per decoder layer, in order, for the first <paramref name="layers"/> blocks.</summary>
    public static IReadOnlyList<LayerActivations> Build(AdapterPlan plan, int actBytes, AttentionImpl attention, long layers,
        LoraRuntime runtime = LoraRuntime.Peft) =>
        Cache.GetOrCreateValue(plan).GetOrAdd((actBytes, attention, layers, runtime), k => Compute(plan, k.Item1, k.Item2, k.Item3, k.Item4));

    /// <summary>
    /// The attention layer <paramref name="layer"/> really runs when <paramref name="requested"/> is asked for:
    /// sdpa falls back to eager where the runtime cannot use it. transformers: gpt-oss and DeepSeek-V4 declare
    /// <c>_supports_sdpa = False</c> (their sinks), so they load eager. MoeLora's runtime: layers with sinks (gpt-oss,
    /// DeepSeek-V4) and Doge's dynamic-mask attention run eagerly (MoeLora.Torch's AttentionMath.Attend).
    /// </summary>
    public static AttentionImpl EffectiveAttention(ModelSpec spec, int layer, AttentionImpl requested, LoraRuntime runtime)
    {
        if (requested == AttentionImpl.Eager) return AttentionImpl.Eager;
        if (runtime == LoraRuntime.Peft) return spec.ModelType is "gpt_oss" or "deepseek_v4" ? AttentionImpl.Eager : AttentionImpl.Sdpa;
        var settings = spec.Runtime is { } r && layer < r.Layers.Count ? r.Layers[layer].Attention : null;
        return settings is StandardAttentionSettings { Sinks: true } or DynamicMaskAttentionSettings or DeepseekV4AttentionSettings
            ? AttentionImpl.Eager : AttentionImpl.Sdpa;
    }

    private static IReadOnlyList<LayerActivations> Compute(AdapterPlan plan, int actBytes, AttentionImpl attention, long layers, LoraRuntime runtime)
    {
        var spec = plan.Spec;
        var moe = spec.Moe;
        var hidden = spec.HiddenSize;
        var heads = spec.NumAttentionHeads;
        var byLayer = plan.Targets.Where(t => t.Layer is not null && t.Location != ModuleLocation.Vision && t.Location != ModuleLocation.Projector)
            .GroupBy(t => t.Layer!.Value).ToDictionary(g => g.Key, g => g.ToList());
        var firstTrained = byLayer.Count == 0 ? int.MaxValue : byLayer.Keys.Min();
        // Adapters outside the decoder layers (embedding LoRA, modules_to_save embeddings) make every layer need grad.
        if (plan.Targets.Any(t => t.Location == ModuleLocation.Embedding) ||
            plan.Extras.Any(e => e.RuntimeName.Contains("embed", StringComparison.Ordinal)))
            firstTrained = 0;
        var result = new List<LayerActivations>();
        var prefix = spec.DecoderLayersPath + ".";
        var modules = spec.Tree.Modules.Where(m => m.LayerIndex is not null && m.Name.StartsWith(prefix, StringComparison.Ordinal))
            .GroupBy(m => m.LayerIndex!.Value).ToDictionary(g => g.Key, g => g.ToList());
        for (var i = 0; i < layers; i++)
        {
            var ms = modules.GetValueOrDefault(i) ?? [];
            long a = actBytes;
            long perToken = 0, perKey = 0, constant = 0, transient = 0, lowRank = 0, recompute = 0;
            var recomputed = runtime == LoraRuntime.MoeLora && moe.IsMoe && moe.MoeLayers.Contains(i) && ExpertsRecomputed(spec, i);
            ModuleNode? Leaf(string name, ModuleLocation? loc = null) =>
                ms.FirstOrDefault(m => m.LeafName == name && m.Kind == ModuleKind.Linear && (loc is null || m.Location == loc));

            // Attention widths from the projections (MLA: q_b_proj and o_proj; k is as wide as q, v as o's input).
            var q = Leaf("q_proj", ModuleLocation.Attention) ?? Leaf("q_b_proj", ModuleLocation.Attention);
            var k = Leaf("k_proj", ModuleLocation.Attention);
            var v = Leaf("v_proj", ModuleLocation.Attention);
            var o = Leaf("o_proj", ModuleLocation.Attention);
            var qw = q?.OutFeatures ?? hidden;
            var ow = o?.InFeatures ?? qw;
            var kw = k?.OutFeatures ?? qw;
            var vw = v?.OutFeatures ?? ow;
            var headDim = heads == 0 ? 0 : qw / heads;

            foreach (var n in ms.Where(m => m.Kind == ModuleKind.Norm && m.Location != ModuleLocation.Vision))
            {
                var width = n.LeafName switch
                {
                    "q_norm" => qw,
                    "k_norm" => kw,
                    _ => n.Parameter("weight")?.Shape[0] ?? hidden,
                };
                perToken += 4 * width;
            }

            var layerAttention = EffectiveAttention(spec, i, attention, runtime);
            if (layerAttention == AttentionImpl.Sdpa && runtime == LoraRuntime.MoeLora)
            {
                perToken += a * (qw + Math.Max(kw, qw) + Math.Max(vw, ow) + ow) + 4 * heads;
            }
            else if (layerAttention == AttentionImpl.Sdpa)
            {
                perToken += a * (qw + kw + vw + ow);
            }
            else
            {
                var expanded = heads * Math.Max(headDim, 1);
                perToken += a * (qw + expanded + Math.Max(expanded, vw));
                var softmaxFp32 = spec.ModelType != "gpt_oss";
                perKey += heads * (softmaxFp32 ? 4 + a : a);
            }

            // Dense MLP and shared experts: gated (gate_proj / up_proj / down_proj).
            foreach (var gate in ms.Where(m => m.Kind == ModuleKind.Linear && m.LeafName == "gate_proj" &&
                (m.Location == ModuleLocation.Mlp || m.Location == ModuleLocation.SharedExpert)))
                perToken += 3 * a * gate.OutFeatures;
            if (ms.Any(m => m.LeafName == "shared_expert_gate")) perToken += a * hidden + 4;

            if (moe.IsMoe && moe.MoeLayers.Contains(i))
            {
                var e = moe.NumExperts;
                var kTop = moe.ExpertsPerToken;
                var inter = moe.ExpertIntermediateSize;
                var perRouted = spec.ModelType == "gpt_oss" ? a * (6 * inter + hidden) : a * (3 * inter + hidden);
                perToken += 4 * e + 12 * kTop;
                if (recomputed)
                {
                    // The experts' input and the node's output buffer, and the grouping reused by the recompute (the
                    // sorted pair order, each pair's token and its padded row: three int64 per routed pair).
                    perToken += 2 * a * hidden + 3 * 8 * kTop;
                    recompute += kTop * perRouted;
                }
                else
                {
                    perToken += kTop * perRouted;
                }
            }

            var dropoutMask = plan.Effective.LoraDropout > 0 ? 1 : 0;
            foreach (var t in byLayer.GetValueOrDefault(i) ?? [])
            {
                switch (t.Kind)
                {
                    case AdapterKind.Linear:
                    {
                        // MoeLora's runtime keeps the input in its own dtype where no dropout mask is drawn (CastLinear,
                        // whose TorchSharp node also holds an empty_like of its r-wide output until backward).
                        var narrow = runtime == LoraRuntime.MoeLora && dropoutMask == 0 && a < 4;
                        var perCall = narrow ? a * t.InFeatures + 8L * t.R : (4 + dropoutMask) * t.InFeatures + 4L * t.R;
                        // A per-expert nn.Linear (transformers 4 layout) sees only the tokens routed to it: k/E of them.
                        if (t.Location == ModuleLocation.RoutedExpert && moe.NumExperts > 0)
                            perToken += perCall * moe.ExpertsPerToken / moe.NumExperts;
                        else
                            perToken += perCall;
                        break;
                    }
                    case AdapterKind.Parameter:
                    {
                        var elems = Util.Shapes.Product(t.BaseShape);
                        var routed = t.NumExperts > 1 && moe.NumExperts > 0 ? moe.ExpertsPerToken : 1;
                        if (runtime == LoraRuntime.MoeLora && t.NumExperts > 1)
                        {
                            // Grouped low-rank: no W+ΔW; the expert input and the r-wide product per routed pair,
                            // recomputed in backward where the layer's experts are.
                            var bytes = routed * a * (t.InFeatures + t.R);
                            if (recomputed) recompute += bytes;
                            else { perToken += routed * a * t.InFeatures; lowRank += routed * a * t.R; }
                            break;
                        }
                        perToken += routed * a * t.InFeatures;
                        // PEFT's ParamWrapper (and MoeLora's own 2-D ParamWrapper deltas, e.g. a router): W+ΔW kept.
                        constant += a * elems;
                        transient = Math.Max(transient, 4 * elems);
                        break;
                    }
                }
            }

            result.Add(new LayerActivations
            {
                Layer = i,
                PerTokenBytes = perToken,
                PerTokenPerKeyBytes = perKey,
                LowRankPerTokenBytes = lowRank,
                RecomputePerTokenBytes = recompute,
                ConstantBytes = constant,
                TransientBytes = transient,
                NeedsGrad = i >= firstTrained,
            });
        }
        return result;
    }
}
