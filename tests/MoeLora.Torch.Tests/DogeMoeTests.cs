using MoeLora.Core.Architectures.Runtime;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// Doge with <c>is_moe</c> (DogeCDMoE) beyond its transformers fixture: the product-key top-k against scoring every
/// pair of keys, the whole block against a token-by-token reading of <c>DogeCDMoE.forward</c> (its [2, T, K] view of
/// the router logits included), the tree against Core's, and LoRA gradients on every adapter.
/// </summary>
public class DogeMoeTests
{
    public DogeMoeTests() => TorchRuntime.EnsureInitialized();

    const string Config = """
        {"model_type": "doge", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.1,
         "is_moe": true, "num_experts": 16, "num_experts_per_tok": 4}
        """;

    // Brute force: the score of expert i·K + j is first[i] + second[j]; the k best of all K² experts, best first.
    static List<(long Expert, double Score)> EveryPairTopK(float[] first, float[] second, int topK)
    {
        int keys = first.Length;
        var pairs = new List<(long, double)>();
        for (int i = 0; i < keys; i++)
            for (int j = 0; j < keys; j++) pairs.Add((i * keys + j, (double)first[i] + second[j]));
        return pairs.OrderByDescending(p => p.Item2).Take(topK).ToList();
    }

    [Theory]
    [InlineData(4, 4)]
    [InlineData(5, 7)]
    [InlineData(3, 9)]
    public void ProductKeyTopKEqualsScoringEveryPair(int keys, int topK)
    {
        const int tokens = 11;
        var g = new Generator(40 + (ulong)keys);
        var first = randn(new long[] { tokens, keys }, generator: g);
        var second = randn(new long[] { tokens, keys }, generator: g);
        var (scores, experts) = DogeCdMoe.ProductKeyTopK(first, second, topK);
        Assert.Equal(new long[] { tokens, topK }, scores.shape);
        for (long t = 0; t < tokens; t++)
        {
            var want = EveryPairTopK(first[t].data<float>().ToArray(), second[t].data<float>().ToArray(), topK);
            Assert.Equal(want.Select(w => w.Expert), experts[t].data<long>().ToArray());
            var got = scores[t].data<float>().ToArray();
            for (int k = 0; k < topK; k++) Assert.True(Math.Abs(got[k] - want[k].Score) < 1e-6, $"token {t} slot {k}: {got[k]} vs {want[k].Score}");
        }
    }

    // DogeCDMoE token by token: logits = router_gate(x) laid out flat as [T·2K] and read as [2, T, K] (row r of the
    // first keys is flat[r·K ..), of the second flat[T·K + r·K ..)); the best k pairs, softmax (renormalised or not);
    // out = down(act(gate x) · up x) + Σ w · act(down_embed[e] · x) · up_embed[e].
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void BlockFollowsDogeCdMoeTokenByToken(bool normTopK)
    {
        const long hidden = 16, experts = 20, topK = 5, inter = 24, batch = 2, seq = 5, tokens = batch * seq;
        var s = new ProductKeyMoeSettings(experts, topK, normTopK, inter, "silu", false);
        Assert.Equal(4, s.NumKeys);
        var moe = new DogeCdMoe(hidden, s, new Init(ScalarType.Float32, CPU, 0.5, new Generator(21)));
        var w = moe.NamedParameters().ToDictionary(x => x.Name, x => (Tensor)x.Param);
        Assert.Equal(["gate_proj.weight", "up_proj.weight", "down_proj.weight", "router_gate.weight", "down_embed.weight", "up_embed.weight"], w.Keys);
        Assert.Equal(new long[] { 2 * s.NumKeys, hidden }, w["router_gate.weight"].shape);
        var x = randn(new long[] { batch, seq, hidden }, generator: new Generator(22));
        var ctx = new ForwardContext { Positions = arange(seq, ScalarType.Int64).unsqueeze(0).expand(batch, -1), AttentionMask = ones(batch, seq, ScalarType.Int64), DType = ScalarType.Float32 };
        using var _ = no_grad();
        var got = moe.Forward(x, ctx).view(tokens, hidden);
        var rows = x.view(tokens, hidden);
        var flat = matmul(rows, w["router_gate.weight"].t()).flatten().data<float>().ToArray();
        int keys = (int)s.NumKeys;
        for (long r = 0; r < tokens; r++)
        {
            var first = flat.Skip((int)(r * keys)).Take(keys).ToArray();
            var second = flat.Skip((int)(tokens * keys + r * keys)).Take(keys).ToArray();
            var chosen = EveryPairTopK(first, second, (int)topK);
            var max = chosen.Max(c => c.Score);
            var weights = chosen.Select(c => Math.Exp(c.Score - max)).ToArray();
            var sum = weights.Sum();
            var want = matmul(w["down_proj.weight"], nn.functional.silu(matmul(w["gate_proj.weight"], rows[r])) * matmul(w["up_proj.weight"], rows[r]));
            for (int k = 0; k < chosen.Count; k++)
            {
                var e = chosen[k].Expert;
                var neuron = nn.functional.silu(matmul(w["down_embed.weight"][e], rows[r]));
                want = want + (neuron * (weights[k] / sum)) * w["up_embed.weight"][e];
            }
            Assert.True(Fixtures.RelError(got[r], want) < 1e-5, $"token {r}: {Fixtures.RelError(got[r], want):E2}");
        }
        // The block returns transformers' [2, T, K] router logits and counts k experts per token.
        Assert.Equal(new long[] { 2, tokens, keys }, ctx.RouterLogits.Single().shape);
        Assert.Equal(tokens * topK, moe.LastSelectedCounts!.Sum());
        Assert.Equal(experts, moe.LastSelectedCounts!.Length);
    }

    // The view mixes tokens: a token's experts come from other tokens' router logits, so changing one token changes
    // the output of tokens that share no attention with it (here: the other row of the batch).
    [Fact]
    public void RoutingReadsOtherTokensLogitsAsTransformersDoes()
    {
        var s = new ProductKeyMoeSettings(16, 4, false, 24, "silu", false);
        var moe = new DogeCdMoe(16, s, new Init(ScalarType.Float32, CPU, 0.5, new Generator(3)));
        ForwardContext Ctx() => new() { Positions = arange(4, ScalarType.Int64).unsqueeze(0).expand(2, -1), AttentionMask = ones(2, 4, ScalarType.Int64), DType = ScalarType.Float32 };
        using var _ = no_grad();
        var x = randn(new long[] { 2, 4, 16 }, generator: new Generator(4));
        var changed = x.clone();
        changed[1, 3].copy_(randn(new long[] { 16 }, generator: new Generator(5)));
        var a = moe.Forward(x, Ctx());
        var b = moe.Forward(changed, Ctx());
        // Token (1, 3) is flat token 7: it feeds the second keys of rows 6 and 7, i.e. row 1's tokens 2 and 3 only.
        Assert.True(Fixtures.RelError(b[0], a[0]) < 1e-7);
        Assert.True(Fixtures.RelError(b[1, ..2], a[1, ..2]) < 1e-7);
        Assert.True(Fixtures.RelError(b[1, 2], a[1, 2]) > 1e-4);
    }

    [Fact]
    public void ParametersEqualCoresTree() => RuntimeChecks.ParametersEqualCoresTree(Config);

    [Fact]
    public void LoraGradientsReachEveryAdapter()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 3));
        // A starts at zero, which makes the dynamic mask exp(0) = 1 whatever dt_proj gives: no gradient would reach it.
        using (no_grad())
            foreach (var (_, a) in h.Model.NamedParameters().Where(p => p.Name.EndsWith(".self_attn.A", StringComparison.Ordinal)))
                a.normal_(0, 0.5, generator: new Generator(9));
        var lora = RuntimeChecks.InjectWithNonZeroB(h.Model, """{"r": 2, "lora_alpha": 4, "target_modules": "all-linear"}""");
        foreach (var module in new[] { "self_attn.q_proj", "self_attn.dt_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj", "mlp.router_gate" })
            Assert.Contains(lora, p => p.Name.Contains($".layers.1.{module}.lora_A", StringComparison.Ordinal));
        RuntimeChecks.EveryAdapterGetsGradient(h.Model, lora);
    }

    // PEFT would adapt the expert embeddings as LoRA Embedding layers, which the runtime does not have: one line.
    [Fact]
    public void ExpertEmbeddingAdaptersAreRefusedInOneLine()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 3));
        var e = Assert.Throws<NotSupportedException>(() => LoraInjector.Inject(h.Model, LoraInjector.Plan(h.Model, """{"r": 2, "target_modules": ["up_embed"]}""")));
        Assert.Contains("up_embed", e.Message);
        Assert.DoesNotContain('\n', e.Message);
    }
}
