using MoeLora.Core.Architectures.Runtime;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// The MLA variants with DeepSeek sparse attention (A.X-K2, DeepSeek-V3.2, GLM-5, HY-V4) and A.X-K's other pieces, beyond
/// their transformers fixtures (MoeTypesParityTests), whose index_topk keeps every key: the indexer's selection
/// against a plain per-token reimplementation of transformers' DeepseekV32Indexer / GlmMoeDsaIndexer / HYV4Indexer, the selection
/// under left padding, A.X-K2's router and gated RMSNorm, and LoRA gradients.
/// </summary>
public class DsaAttentionTests
{
    public DsaAttentionTests() => TorchRuntime.EnsureInitialized();

    // MLA with a low-rank q, one dense layer then MoE; the indexer keeps 3 keys, so it restricts rows from the 4th token.
    const string Shape = """
        "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1, "n_routed_experts": 8,
        "num_experts_per_tok": 2, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
        "v_head_dim": 8, "rms_norm_eps": 1e-6, "initializer_range": 0.1, "index_n_heads": 4, "index_head_dim": 16,
        "index_topk": 3, "mlp_layer_types": ["dense", "sparse", "sparse"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}
        """;

    static string Axk2 => "{" + Shape + """, "model_type": "axk2", "gated_norm_rank": 4, "n_group": 2, "topk_group": 1}""";

    static string DeepseekV32 => "{" + Shape + """, "model_type": "deepseek_v32", "n_group": 2, "topk_group": 1}""";

    static string GlmMoeDsa => "{" + Shape + """, "model_type": "glm_moe_dsa", "indexer_types": ["full", "shared", "full"]}""";

    // HY-V4: the same MLA shape plus sinks, the output gate, clamped experts and 4 hyper-connection streams; its indexer
    // rotates the last rope dims of each head.
    static string HyV4 => "{" + Shape + """, "model_type": "hy_v4", "indexer_types": ["full", "shared", "full"], "swiglu_limit": 0.5}""";

    static string Axk1 => """
        {"model_type": "axk1", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4, "n_shared_experts": 1,
         "n_routed_experts": 8, "num_experts_per_tok": 2, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
         "qk_rope_head_dim": 8, "v_head_dim": 8, "initializer_range": 0.1, "first_k_dense_replace": 1, "n_group": 2,
         "topk_group": 1, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
        """;

    public static TheoryData<string> SparseConfigs() => new() { Axk2, DeepseekV32, GlmMoeDsa, HyV4 };

    static float[] Floats(Tensor t) => t.detach().to(ScalarType.Float32).contiguous().data<float>().ToArray();

    // transformers' indexer written out per query, key and head: k = LayerNorm(wk·x), q = wq_b·q_latent per head,
    // rope on the first rope dims of both (halves, or GLM-5's interleaved pairs), score = Σ_h w_h·h^-0.5·relu(q_h·k·d^-0.5)
    // with w = weights_proj·x. Every real query must keep the best min(top-k, visible) of the keys it may see.
    // HYV4Indexer rotates the last rope dims instead (pass, then rot) and its k_norm uses rms_norm_eps.
    [Theory]
    [InlineData(false, false)]
    [InlineData(true, false)]
    [InlineData(false, true)]
    public void IndexerKeepsTheBestScoringVisibleKeys(bool interleaved, bool ropeOnLast)
    {
        const int hidden = 16, qRank = 8, heads = 3, d = 8, rope = 4, topK = 3, batch = 2, seq = 7, pad = 2;
        double kNormEps = ropeOnLast ? 1e-5 : 1e-6;
        int at0 = ropeOnLast ? d - rope : 0;
        var settings = new DsaIndexerSettings(heads, d, topK, interleaved, ropeOnLast, kNormEps);
        var indexer = new DsaIndexer(hidden, qRank, rope, settings, new Init(ScalarType.Float32, CPU, 0.5, new Generator(11)));
        var p = indexer.NamedParameters().ToDictionary(x => x.Name, x => x.Param);
        using (no_grad())
        {
            // The LayerNorm starts as the identity (ones, zeros); give it values so its weight and bias count.
            p["k_norm.weight"].normal_(1, 0.3, generator: new Generator(12));
            p["k_norm.bias"].normal_(0, 0.3, generator: new Generator(13));
        }
        var x = randn(new long[] { batch, seq, hidden }, generator: new Generator(14));
        var qLatent = randn(new long[] { batch, seq, qRank }, generator: new Generator(15));
        var realMask = ones(batch, seq, ScalarType.Int64);
        realMask[1, ..pad] = zeros(pad, ScalarType.Int64);
        var ctx = new ForwardContext
        {
            Positions = arange(seq, ScalarType.Int64).unsqueeze(0).expand(batch, seq).contiguous(),
            AttentionMask = realMask,
            DType = ScalarType.Float32,
        };
        var rotary = Rotary.FromSettings(new RopeSettings("default", 10000.0, rope));
        var mask = ctx.Mask(MaskKind.Full);
        var got = indexer.TopK(x, qLatent, mask, rotary, ctx);
        Assert.Equal(new long[] { batch, seq, topK }, got.shape);
        var restricted = DsaIndexer.Restrict(mask, got);

        float[] wq = Floats(p["wq_b.weight"]), wk = Floats(p["wk.weight"]), wp = Floats(p["weights_proj.weight"]);
        float[] lnW = Floats(p["k_norm.weight"]), lnB = Floats(p["k_norm.bias"]);
        float[] xs = Floats(x), qs = Floats(qLatent), ms = Floats(mask), rs = Floats(restricted);
        var sel = got.data<long>().ToArray();

        double[] Rotate(double[] v, int pos)
        {
            var o = (double[])v.Clone();
            for (int i = 0; i < rope / 2; i++)
            {
                double f = pos / Math.Pow(10000.0, 2.0 * i / rope), c = Math.Cos(f), s = Math.Sin(f);
                if (interleaved)
                {
                    // apply_rotary_pos_emb_interleave: pairs (2i, 2i+1), the results laid out as halves.
                    o[at0 + i] = v[at0 + 2 * i] * c - v[at0 + 2 * i + 1] * s;
                    o[at0 + rope / 2 + i] = v[at0 + 2 * i + 1] * c + v[at0 + 2 * i] * s;
                }
                else
                {
                    o[at0 + i] = v[at0 + i] * c - v[at0 + i + rope / 2] * s;
                    o[at0 + i + rope / 2] = v[at0 + i + rope / 2] * c + v[at0 + i] * s;
                }
            }
            return o;
        }
        double[] Key(int b, int t)
        {
            var k = new double[d];
            for (int j = 0; j < d; j++)
                for (int i = 0; i < hidden; i++) k[j] += wk[j * hidden + i] * xs[(b * seq + t) * hidden + i];
            double mean = k.Average(), variance = k.Select(v => (v - mean) * (v - mean)).Average();
            return Rotate(k.Select((v, j) => (v - mean) / Math.Sqrt(variance + kNormEps) * lnW[j] + lnB[j]).ToArray(), t);
        }
        double Score(int b, int s, int t)
        {
            var k = Key(b, t);
            double total = 0;
            for (int h = 0; h < heads; h++)
            {
                var q = new double[d];
                for (int j = 0; j < d; j++)
                    for (int i = 0; i < qRank; i++) q[j] += wq[(h * d + j) * qRank + i] * qs[(b * seq + s) * qRank + i];
                q = Rotate(q, s);
                double dot = q.Zip(k, (a, c) => a * c).Sum() / Math.Sqrt(d);
                double w = 0;
                for (int i = 0; i < hidden; i++) w += wp[h * hidden + i] * xs[(b * seq + s) * hidden + i];
                total += w / Math.Sqrt(heads) * Math.Max(dot, 0);
            }
            return total;
        }

        int restrictedRows = 0;
        for (int b = 0; b < batch; b++)
            for (int s = b == 1 ? pad : 0; s < seq; s++)
            {
                var visible = Enumerable.Range(b == 1 ? pad : 0, seq - (b == 1 ? pad : 0)).Where(t => t <= s).ToList();
                var chosen = Enumerable.Range(0, topK).Select(k => (int)sel[(b * seq + s) * topK + k]).ToHashSet();
                var kept = visible.Where(chosen.Contains).ToList();
                Assert.Equal(Math.Min(topK, visible.Count), kept.Count);
                var scores = visible.ToDictionary(t => t, t => Score(b, s, t));
                foreach (var t in kept)
                    foreach (var u in visible.Except(kept))
                        Assert.True(scores[t] >= scores[u] - 1e-5, $"row {b}, query {s}: key {t} ({scores[t]}) kept over {u} ({scores[u]})");
                if (visible.Count > topK) restrictedRows++;
                // The restricted mask keeps a key only where the causal/padding mask did and the indexer chose it.
                for (int t = 0; t < seq; t++)
                {
                    var at = (b * seq + s) * seq + t;
                    Assert.Equal(kept.Contains(t) ? 0f : float.MinValue, rs[at]);
                    if (kept.Contains(t)) Assert.Equal(0f, ms[at]);
                }
            }
        Assert.True(restrictedRows >= 5, "the test must have rows with more visible keys than the indexer keeps");
    }

    // transformers adds the causal/padding mask to the index scores before the top-k, so padding is never chosen while
    // enough real keys are visible, and rope is relative: a left-padded row gives what its tokens give alone. Shared GLM-5
    // layers reuse the previous layer's selection, which must follow the same rows.
    [Theory]
    [MemberData(nameof(SparseConfigs))]
    public void LeftPaddedRowEqualsTheRowAlone(string config)
    {
        using var h = new DisposableModel(TorchModelFactory.Random(config, 5));
        using var _ = no_grad();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var batch = h.Model.Forward(ids, mask, outputHiddenStates: true);
        using var alone = h.Model.Forward(ids[1, 3..].unsqueeze(0), outputHiddenStates: true);
        for (int i = 0; i < batch.HiddenStates.Count; i++)
        {
            var err = Fixtures.RelError(batch.HiddenStates[i][1, 3..], alone.HiddenStates[i][0]);
            Assert.True(err < 1e-5, $"hidden state {i}, padded row vs alone: {err:E2}");
        }
        Assert.True(Fixtures.RelError(batch.Logits[1, 3..], alone.Logits[0]) < 1e-5);
    }

    // The selection must act: keeping 3 keys changes what a model that keeps every key computes, from the 4th token on.
    [Theory]
    [MemberData(nameof(SparseConfigs))]
    public void TheIndexerRestrictsAttentionFromTheFirstRowWithMoreKeysThanItKeeps(string config)
    {
        using var sparse = new DisposableModel(TorchModelFactory.Random(config, 5));
        using var dense = new DisposableModel(TorchModelFactory.Random(config.Replace("\"index_topk\": 3", "\"index_topk\": 2048", StringComparison.Ordinal), 5));
        using var _ = no_grad();
        var (ids, _) = RuntimeChecks.LeftPaddedBatch();
        using var a = sparse.Model.Forward(ids[0].unsqueeze(0));
        using var b = dense.Model.Forward(ids[0].unsqueeze(0));
        Assert.True(Fixtures.RelError(a.Logits[0, ..3], b.Logits[0, ..3]) < 1e-6);
        Assert.True(Fixtures.RelError(a.Logits[0, 3..], b.Logits[0, 3..]) > 1e-3);
    }

    // A.X-K2's grouped scoring (AXK2TopkRouter.apply_group_scoring) fills the other groups with 0.0 where DeepSeek-V3
    // uses -inf: with a negative correction bias a kept group's expert can score below 0 and lose to them.
    [Theory]
    [InlineData(0.0)]
    [InlineData(double.NegativeInfinity)]
    public void GroupedSigmoidRoutingFollowsTransformers(double otherGroups)
    {
        const int experts = 8, groups = 4, topKGroups = 2, topK = 3, tokens = 32;
        var r = new SigmoidGroupLimitedRouterSettings("gate", experts, topK, groups, topKGroups, true, 2.5, otherGroups);
        var logits = randn(new long[] { tokens, experts }, generator: new Generator(4)) * 2;
        var bias = tensor(new float[] { -0.9f, 0.1f, -0.8f, 0.2f, -0.7f, 0.0f, -0.95f, 0.3f });
        var (idx, w) = SigmoidGroupLimitedMoe.Route(logits, bias, r);
        var scores = Floats(logits.sigmoid());
        var b = Floats(bias);
        var gotIdx = idx.data<long>().ToArray();
        var gotW = Floats(w);
        int differsFromMinusInf = 0;
        for (int t = 0; t < tokens; t++)
        {
            var choice = Enumerable.Range(0, experts).Select(e => (double)scores[t * experts + e] + b[e]).ToArray();
            int per = experts / groups;
            var groupScore = Enumerable.Range(0, groups).Select(g => choice.Skip(g * per).Take(per).OrderDescending().Take(2).Sum()).ToArray();
            var kept = Enumerable.Range(0, groups).OrderByDescending(g => groupScore[g]).Take(topKGroups).ToHashSet();
            var masked = choice.Select((v, e) => kept.Contains(e / per) ? v : otherGroups).ToArray();
            // The dropped experts all score exactly 0, so which of them fill the top-k is torch.topk's tie-break: any
            // k experts none of which scores below an expert left out are transformers' choice.
            var got = Enumerable.Range(0, topK).Select(k => (E: (int)gotIdx[t * topK + k], W: (double)gotW[t * topK + k])).ToArray();
            Assert.Equal(topK, got.Select(x => x.E).Distinct().Count());
            var left = Enumerable.Range(0, experts).Except(got.Select(x => x.E)).ToList();
            Assert.True(got.All(x => left.All(u => masked[x.E] >= masked[u])), $"token {t}: not a top-{topK} of the masked scores");
            if (got.Any(x => !kept.Contains(x.E / per))) differsFromMinusInf++;
            var sum = got.Sum(x => (double)scores[t * experts + x.E]) + 1e-20;
            foreach (var (e, weight) in got) Assert.Equal(scores[t * experts + e] / sum * 2.5, weight, 5);
        }
        // With 0 some tokens must pick an expert of a dropped group, or the two fills would not be told apart.
        Assert.Equal(otherGroups == 0.0, differsFromMinusInf > 0);
    }

    // AXK2GatedRMSNorm: y = RMSNorm(x), then y · sigmoid(fc2(silu(fc1(y)))).
    [Fact]
    public void GatedRmsNormGatesTheNormedInput()
    {
        var norm = new GatedRmsNorm(6, new NormSettings(NormKind.GatedRms, 1e-6, GateRank: 3), new Init(ScalarType.Float32, CPU, 0.5, new Generator(2)));
        var p = norm.NamedParameters().ToDictionary(x => x.Name, x => x.Param);
        Assert.Equal(["norm.weight", "mlp.fc1.weight", "mlp.fc2.weight"], p.Keys);
        using (no_grad()) p["norm.weight"].normal_(1, 0.3, generator: new Generator(3));
        var x = randn(new long[] { 2, 6 }, generator: new Generator(4));
        using var _ = no_grad();
        var y = x * rsqrt(x.pow(2).mean([-1], keepdim: true) + 1e-6) * p["norm.weight"];
        var gate = nn.functional.linear(nn.functional.silu(nn.functional.linear(y, p["mlp.fc1.weight"])), p["mlp.fc2.weight"]);
        var want = y * gate.sigmoid();
        Assert.True(Fixtures.RelError(norm.Forward(x), want) < 1e-6);
        Assert.True(Fixtures.RelError(norm.Forward(x), y) > 1e-2);
    }

    public static TheoryData<string> LoraConfigs() => new() { Axk1, Axk2, GlmMoeDsa, HyV4 };

    // All linear layers and the experts: every adapter learns, except the indexer's, which transformers runs under
    // torch.no_grad() (its output is integer indices), so they get no gradient there or here.
    [Theory]
    [MemberData(nameof(LoraConfigs))]
    public void LoraGradientsReachEveryAdapterOutsideTheIndexer(string config) =>
        MlaVariantsTests.AssertLoraGradients(config, name => name.Contains(".indexer.", StringComparison.Ordinal),
            config == Axk2 ? ["q_gate_proj.lora_A", "input_layernorm.mlp.fc1.lora_A", "self_attn.indexer.wq_b.lora_A"]
            : config == HyV4 ? ["self_attn.gate_proj.lora_A", "shared_experts.gate_proj.lora_A", "self_attn.indexer.wq_b.lora_A"] : []);

    // transformers raises for a "shared" first layer (no earlier selection to reuse); the runtime refuses it in one line.
    [Fact]
    public void Glm5WithASharedFirstLayerIsRefusedInOneLine()
    {
        var config = GlmMoeDsa.Replace("[\"full\", \"shared\", \"full\"]", "[\"shared\", \"full\", \"full\"]", StringComparison.Ordinal);
        Assert.NotEqual(GlmMoeDsa, config);
        var e = Assert.Throws<NotSupportedException>(() => TorchModelFactory.Random(config, 0));
        Assert.Contains("no earlier indexer to reuse", e.Message, StringComparison.Ordinal);
        Assert.DoesNotContain('\n', e.Message);
    }
}
