using MoeLora.Core.Architectures.Runtime;
using MoeLora.Torch.IO;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Tests.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// DeepSeek-V2, GLM-4.7-Flash (glm4_moe_lite) and Mistral 4 beyond their transformers fixtures (MoeTypesParityTests):
/// against the fixture-checked DeepSeek-V3 runtime on the same weights where the math coincides,
/// their routers against a plain per-token reimplementation of transformers' code, left padding, and LoRA gradients.
/// </summary>
public class MlaVariantsTests
{
    public MlaVariantsTests() => TorchRuntime.EnsureInitialized();

    // Shared shape: MLA with a low-rank q, one dense layer then MoE layers with one shared expert.
    const string Shape = """
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1, "q_lora_rank": 16, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "rms_norm_eps": 1e-6, "initializer_range": 0.1,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}
        """;

    // One routed expert: V2's softmax weight is exactly 1, V3's renormalised sigmoid weight is 1 up to 1e-20, so both
    // routers give routed_scaling_factor. V3 rotates de-interleaved halves (rope_interleave), V2 complex pairs: the
    // rotated vectors are the same numbers in another order, applied alike to q and k, so the scores are equal.
    static string V3OneExpert => "{" + Shape + """
        , "model_type": "deepseek_v3", "n_routed_experts": 1, "num_experts_per_tok": 1, "first_k_dense_replace": 1,
        "n_group": 1, "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 1.5, "rope_interleave": true}
        """;

    static string V2OneExpert => "{" + Shape + """
        , "model_type": "deepseek_v2", "n_routed_experts": 1, "num_experts_per_tok": 1, "first_k_dense_replace": 1,
        "topk_method": "greedy", "routed_scaling_factor": 1.5}
        """;

    static string V2GroupLimited => "{" + Shape + """
        , "model_type": "deepseek_v2", "n_routed_experts": 8, "num_experts_per_tok": 3, "first_k_dense_replace": 1,
        "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.0}
        """;

    static string GlmLite => "{" + Shape + """
        , "model_type": "glm4_moe_lite", "n_routed_experts": 8, "num_experts_per_tok": 2, "mlp_layer_types": ["dense", "sparse", "sparse"],
        "n_group": 2, "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 1.8, "rope_interleave": true}
        """;

    // The same model as GlmLite, declared as DeepSeek-V3.
    static string V3AsGlmLite => "{" + Shape + """
        , "model_type": "deepseek_v3", "n_routed_experts": 8, "num_experts_per_tok": 2, "first_k_dense_replace": 1,
        "n_group": 2, "topk_group": 1, "norm_topk_prob": true, "routed_scaling_factor": 1.8, "rope_interleave": true}
        """;

    // Mistral 4 with a rope width that transformers can run: head_dim 16 · partial_rotary_factor 0.5 = qk_rope_head_dim.
    static string Mistral4(double originalMax, double beta = 0.1) => """
        {"model_type": "mistral4", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1, "q_lora_rank": 16,
         "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "head_dim": 16, "rms_norm_eps": 1e-6,
         "initializer_range": 0.1, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
         "first_k_dense_replace": 1, "norm_topk_prob": true, "routed_scaling_factor": 1.0, "rope_interleave": true,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": ORIG,
           "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0, "llama_4_scaling_beta": BETA,
           "partial_rotary_factor": 0.5}}
        """.Replace("ORIG", originalMax.ToString(System.Globalization.CultureInfo.InvariantCulture), StringComparison.Ordinal)
        .Replace("BETA", beta.ToString(System.Globalization.CultureInfo.InvariantCulture), StringComparison.Ordinal);

    static void CopyWeights(CausalLm from, CausalLm to)
    {
        var source = from.NamedParameters().ToDictionary(p => p.Name, p => p.Param);
        var target = to.NamedParameters().ToList();
        Assert.Equal(source.Keys.Order(StringComparer.Ordinal), target.Select(p => p.Name).Order(StringComparer.Ordinal));
        using var _ = no_grad();
        foreach (var (name, p) in target) p.copy_(source[name]);
    }

    static void AssertSameOutputs(string wantConfig, string gotConfig, double tolerance)
    {
        using var want = new DisposableModel(TorchModelFactory.Random(wantConfig, 7));
        using var got = new DisposableModel(TorchModelFactory.Random(gotConfig, 8));
        CopyWeights(want.Model, got.Model);
        using var _ = no_grad();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var a = want.Model.Forward(ids, mask, outputHiddenStates: true);
        using var b = got.Model.Forward(ids, mask, outputHiddenStates: true);
        Assert.Equal(a.HiddenStates.Count, b.HiddenStates.Count);
        for (int i = 0; i < a.HiddenStates.Count; i++)
        {
            var err = Fixtures.MaskedRelError(b.HiddenStates[i], a.HiddenStates[i], mask);
            Assert.True(err < tolerance, $"hidden state {i}: {err:E2}");
        }
        var logitsErr = Fixtures.MaskedRelError(b.Logits, a.Logits, mask);
        Assert.True(logitsErr < tolerance, $"logits: {logitsErr:E2}");
        // A different model must not pass: the weights were copied, not shared by chance.
        Assert.True(Fixtures.MaskedRelError(b.Logits, a.Logits * 1.01, mask) > tolerance);
    }

    [Fact]
    public void DeepseekV2EqualsV3OnTheSameWeightsWhereTheirMathCoincides() => AssertSameOutputs(V3OneExpert, V2OneExpert, 1e-5);

    [Fact]
    public void GlmLiteEqualsDeepseekV3OnTheSameWeights() => AssertSameOutputs(V3AsGlmLite, GlmLite, 1e-6);

    // V2's complex-pair rope differs from V3's only in the order of the rotated dims; a model whose rope were not
    // applied (or applied to other dims) would differ. Guard: with rope_interleave false V3 rotates other pairs.
    [Fact]
    public void DeepseekV2DiffersFromV3WithoutRopeInterleave()
    {
        using var v3 = new DisposableModel(TorchModelFactory.Random(V3OneExpert.Replace("\"rope_interleave\": true", "\"rope_interleave\": false", StringComparison.Ordinal), 7));
        using var v2 = new DisposableModel(TorchModelFactory.Random(V2OneExpert, 8));
        CopyWeights(v3.Model, v2.Model);
        using var _ = no_grad();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var a = v3.Model.Forward(ids, mask);
        using var b = v2.Model.Forward(ids, mask);
        Assert.True(Fixtures.MaskedRelError(b.Logits, a.Logits, mask) > 1e-4);
    }

    // The complex rotation of DeepSeek-V2's apply_rotary_emb, written out per pair: (a + ib)·(cos f + i sin f).
    [Fact]
    public void ComplexPairRopeRotatesAdjacentPairs()
    {
        var x = randn(new long[] { 1, 3, 2, 4 }, generator: new Generator(1)); // [B, S, heads, d]
        var freqs = tensor(new float[] { 0.1f, 0.7f, 0.2f, 1.1f, 0.3f, 1.5f }).view(1, 3, 2); // [B, S, d/2]
        using var got = Rotary.ApplyComplexPairs(x, freqs, 2.0);
        var xs = x.data<float>().ToArray();
        var fs = freqs.data<float>().ToArray();
        var gs = got.data<float>().ToArray();
        for (int s = 0; s < 3; s++)
            for (int h = 0; h < 2; h++)
                for (int i = 0; i < 2; i++)
                {
                    int at = ((s * 2) + h) * 4 + 2 * i;
                    double a = xs[at], b = xs[at + 1], f = fs[s * 2 + i];
                    Assert.Equal(2 * (a * Math.Cos(f) - b * Math.Sin(f)), gs[at], 5);
                    Assert.Equal(2 * (a * Math.Sin(f) + b * Math.Cos(f)), gs[at + 1], 5);
                }
    }

    // transformers' routers, token by token: softmax; groups scored by their best (V2) or best two (Mistral 4);
    // the best topk_group groups kept, the others' scores 0; top-k; weights as each model takes them.
    [Theory]
    [InlineData(GroupScore.Max, false, false, 2.0)]
    [InlineData(GroupScore.TopTwoSum, true, true, 1.5)]
    [InlineData(GroupScore.TopTwoSum, true, false, 1.0)]
    public void SoftmaxGroupLimitedRoutingFollowsTransformers(GroupScore score, bool fromScores, bool norm, double scale)
    {
        const int experts = 8, groups = 4, topKGroups = 2, topK = 3;
        var r = new SoftmaxGroupLimitedRouterSettings("gate", experts, topK, groups, topKGroups, score, fromScores, norm, scale, InFp32: true);
        var logits = randn(new long[] { 16, experts }, generator: new Generator(4)) * 2;
        var (idx, w) = SoftmaxGroupLimitedMoe.Route(logits, r);
        var probs = logits.softmax(-1).data<float>().ToArray();
        var gotIdx = idx.data<long>().ToArray();
        var gotW = w.data<float>().ToArray();
        for (int t = 0; t < 16; t++)
        {
            var p = probs.Skip(t * experts).Take(experts).ToArray();
            int per = experts / groups;
            var groupScore = Enumerable.Range(0, groups).Select(g =>
            {
                var members = p.Skip(g * per).Take(per).OrderDescending().ToArray();
                return score == GroupScore.Max ? members[0] : members[0] + members[1];
            }).ToArray();
            var kept = Enumerable.Range(0, groups).OrderByDescending(g => groupScore[g]).Take(topKGroups).ToHashSet();
            var masked = p.Select((v, e) => kept.Contains(e / per) ? v : 0f).ToArray();
            var chosen = Enumerable.Range(0, experts).OrderByDescending(e => masked[e]).Take(topK).ToArray();
            var weights = chosen.Select(e => (double)(fromScores ? p[e] : masked[e])).ToArray();
            if (norm) { var sum = weights.Sum() + 1e-20; weights = weights.Select(v => v / sum).ToArray(); }
            var got = Enumerable.Range(0, topK).Select(k => (E: gotIdx[t * topK + k], W: gotW[t * topK + k])).OrderBy(p => p.E).ToArray();
            var want = chosen.Select((e, k) => (E: (long)e, W: weights[k] * scale)).OrderBy(p => p.E).ToArray();
            Assert.Equal(want.Select(p => p.E), got.Select(p => p.E));
            for (int k = 0; k < topK; k++) Assert.Equal(want[k].W, got[k].W, 5);
        }
    }

    public static TheoryData<string> Configs() => new() { V2GroupLimited, GlmLite, Mistral4(8192) };

    // Rope is relative and nothing else depends on the absolute position here (Mistral 4's query scale is 1 below
    // original_max_position_embeddings), so a left-padded row must give what its tokens give alone.
    [Theory]
    [MemberData(nameof(Configs))]
    public void LeftPaddedRowEqualsTheRowAlone(string config) => RuntimeChecks.PaddedRowEqualsTheRowAlone(config);

    // Mistral 4 multiplies the query by 1 + β·log(1 + floor(pos / original_max_position_embeddings)): with original_max 4
    // from position 4 on, and not at all with β = 0 (yarn's tables depend on original_max, so β is what varies here).
    [Fact]
    public void Mistral4QueryScaleActsFromOriginalMaxPositionEmbeddings()
    {
        using var off = new DisposableModel(TorchModelFactory.Random(Mistral4(4, beta: 0), 5));
        using var on = new DisposableModel(TorchModelFactory.Random(Mistral4(4, beta: 0.5), 5));
        using var _ = no_grad();
        var ids = tensor(new long[] { 3, 4, 5, 6, 7, 8, 9, 10 }).unsqueeze(0);
        using var a = off.Model.Forward(ids);
        using var b = on.Model.Forward(ids);
        Assert.True(Fixtures.RelError(b.Logits[0, ..4], a.Logits[0, ..4]) < 1e-6);
        Assert.True(Fixtures.RelError(b.Logits[0, 4..], a.Logits[0, 4..]) > 1e-4);
    }

    [Theory]
    [MemberData(nameof(Configs))]
    public void LoraGradientsReachEveryAdapter(string config) => AssertLoraGradients(config);

    /// <summary>
    /// All linear layers and the experts get LoRA adapters (kv_b_proj's and the experts' among them, and every name in
    /// <paramref name="adapted"/>); one backward pass of a left-padded batch must give each a finite non-zero gradient,
    /// except those <paramref name="noGradient"/> names, which must get none.
    /// </summary>
    internal static void AssertLoraGradients(string config, Func<string, bool>? noGradient = null, params string[] adapted)
    {
        using var h = new DisposableModel(TorchModelFactory.Random(config, 3));
        var lora = RuntimeChecks.InjectWithNonZeroB(h.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": "all-linear", "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
            """);
        foreach (var name in adapted.Append("kv_b_proj.lora_A").Append("mlp.experts.lora_A"))
            Assert.Contains(lora, p => p.Name.Contains(name, StringComparison.Ordinal));
        RuntimeChecks.AssertGradients(RuntimeChecks.Backward(h.Model, lora).Grads, noGradient);
    }

    [Theory]
    [InlineData("\"topk_method\": \"group_limited_greedy\"", "\"topk_method\": \"noaux_tc\"", "topk_method 'noaux_tc'")]
    [InlineData("\"n_group\": 4", "\"n_group\": 3", "group_limited_greedy needs n_group")]
    [InlineData("\"num_experts_per_tok\": 3,", "", "without num_experts_per_tok")]
    public void DeepseekV2ConfigsTransformersCannotRouteAreRefusedInOneLine(string from, string to, string reason)
    {
        var config = V2GroupLimited.Replace(from, to, StringComparison.Ordinal);
        Assert.NotEqual(V2GroupLimited, config);
        var e = Assert.Throws<NotSupportedException>(() => TorchModelFactory.Random(config, 0));
        Assert.Contains(reason, e.Message, StringComparison.Ordinal);
        Assert.DoesNotContain('\n', e.Message);
    }

    // transformers' yarn rotates head_dim · partial_rotary_factor dims; 24 · 0.5 is not qk_rope_head_dim 8, so its forward
    // fails and the runtime refuses (the repository's oracle config for mistral4 is such a config).
    [Fact]
    public void Mistral4WithAnotherRopeWidthIsRefused()
    {
        var config = Mistral4(8192).Replace("\"head_dim\": 16", "\"head_dim\": 24", StringComparison.Ordinal);
        var e = Assert.Throws<NotSupportedException>(() => TorchModelFactory.Random(config, 0));
        Assert.Contains("rotary width (12)", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [MemberData(nameof(Configs))]
    public void ParametersEqualCoresTree(string config)
    {
        var spec = TorchModelFactory.Spec(config);
        using var h = new DisposableModel(TorchModelFactory.Random(config, 0));
        Assert.Equal(spec.Tree.Parameters.Select(p => $"{p.Name} [{string.Join(",", p.Shape)}]"),
            h.Model.NamedParameters().Select(p => $"{p.Name} [{string.Join(",", p.Param.shape)}]"));
    }

    // The Hub stores DeepSeek-V2 and GLM-4.7-Flash experts one by one (experts.{e}.gate_proj / up_proj / down_proj);
    // Core's checkpoint layout stacks them into the fused runtime parameters. A checkpoint written that way must load
    // into the same model.
    [Theory]
    [InlineData("deepseek_v2")]
    [InlineData("glm4_moe_lite")]
    public void PerExpertCheckpointLoadsIntoTheSameModel(string type)
    {
        var config = type == "deepseek_v2" ? V2GroupLimited : GlmLite;
        using var original = new DisposableModel(TorchModelFactory.Random(config, 9));
        var tensors = new List<KeyValuePair<string, Tensor>>();
        foreach (var (name, value) in original.Model.StateDict())
        {
            if (name.EndsWith(".experts.gate_up_proj", StringComparison.Ordinal))
            {
                var prefix = name[..^"gate_up_proj".Length];
                var halves = value.chunk(2, 1);
                for (int e = 0; e < value.shape[0]; e++)
                {
                    tensors.Add(new($"{prefix}{e}.gate_proj.weight", halves[0][e].contiguous()));
                    tensors.Add(new($"{prefix}{e}.up_proj.weight", halves[1][e].contiguous()));
                }
            }
            else if (name.EndsWith(".experts.down_proj", StringComparison.Ordinal))
            {
                var prefix = name[..^"down_proj".Length];
                for (int e = 0; e < value.shape[0]; e++) tensors.Add(new($"{prefix}{e}.down_proj.weight", value[e].contiguous()));
            }
            else tensors.Add(new(name, value));
        }
        Assert.Contains(tensors, t => t.Key == "model.layers.1.mlp.experts.7.down_proj.weight");
        using var dir = new TempDir();
        File.WriteAllText(Path.Combine(dir.Path, "config.json"), config);
        Safetensors.Save(Path.Combine(dir.Path, "model.safetensors"), tensors, new Dictionary<string, string> { ["format"] = "pt" });
        using var loaded = new DisposableModel(TorchModelFactory.Load(dir.Path));
        using var _ = no_grad();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var a = original.Model.Forward(ids, mask);
        using var b = loaded.Model.Forward(ids, mask);
        Assert.True(a.Logits.bytes.SequenceEqual(b.Logits.bytes));
    }
}
