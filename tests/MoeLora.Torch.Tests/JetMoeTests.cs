using MoeLora.Core.Architectures.Runtime;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// JetMoE beyond its transformers fixture (MoeTypesParityTests): the mixture of attention heads against a token-by-token
/// reading of transformers' JetMoeAttention, left padding, grouped vs looped experts, and LoRA gradients on the
/// attention and MLP parallel experts.
/// </summary>
public class JetMoeTests
{
    public JetMoeTests() => TorchRuntime.EnsureInitialized();

    const string Config = """
        {"model_type": "jetmoe", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 2,
         "num_key_value_heads": 2, "kv_channels": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
         "initializer_range": 0.1, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}
        """;

    // Per token t, its k experts each give kv query heads; slot j's head h attends over keys and values of kv head h
    // at tokens ≤ t (rope by rotating halves); each slot's output goes through the same expert's output projection,
    // weighted by the gate; then the bias.
    [Fact]
    public void MixtureOfAttentionHeadsFollowsJetMoeAttentionTokenByToken()
    {
        const long hidden = 16, kv = 2, d = 4, experts = 4, topK = 2, seq = 6;
        var router = new TopKLogitsRouterSettings("router.layer", experts, topK, TopKScore.SoftmaxFp32, false, true, true);
        var init = new Init(ScalarType.Float32, CPU, 0.5, new Generator(11));
        var attn = new JetMoeAttention(hidden, new MixtureOfAttentionHeadsSettings(router, kv, d),
            Rotary.FromSettings(new RopeSettings("default", 10000.0, d)), init);
        var p = attn.NamedParameters().ToDictionary(x => x.Name, x => (Tensor)x.Param);
        using (no_grad()) p["experts.bias"].normal_(0, 0.5, generator: new Generator(12));
        var x = randn(new long[] { 1, seq, hidden }, generator: new Generator(13));
        var ctx = new ForwardContext { Positions = arange(seq, ScalarType.Int64).unsqueeze(0), AttentionMask = ones(1, seq, ScalarType.Int64), DType = ScalarType.Float32 };
        using var _ = no_grad();
        var got = attn.Forward(x, ctx)[0];
        Assert.Equal(2, ctx.RouterLogits.Count);

        var win = p["experts.input_linear.weight"];    // [E, kv·d, H]
        var wout = p["experts.output_linear.weight"];  // [E, H, kv·d]
        var kvOut = nn.functional.linear(x[0], p["kv_proj.weight"]).chunk(2, -1);
        var keys = stack(Enumerable.Range(0, (int)seq).Select(s => Rope(kvOut[0][s].view(kv, d), s, d)).ToList());
        var values = kvOut[1].view(seq, kv, d);
        var logits = nn.functional.linear(x[0], p["experts.router.layer.weight"]);
        for (long t = 0; t < seq; t++)
        {
            var (top, idx) = logits[t].topk((int)topK);
            var gates = top.softmax(0);
            var want = p["experts.bias"].clone();
            for (long j = 0; j < topK; j++)
            {
                var e = idx[j].item<long>();
                var q = Rope(matmul(win[e], x[0, t]).view(kv, d), t, d);
                var heads = new List<Tensor>();
                for (long h = 0; h < kv; h++)
                {
                    var scores = (matmul(keys[..(int)(t + 1), h], q[h]) / Math.Sqrt(d)).softmax(0);
                    heads.Add(matmul(scores, values[..(int)(t + 1), h]));
                }
                want = want + gates[j] * matmul(wout[e], cat(heads, 0));
            }
            Assert.True(Fixtures.RelError(got[t], want) < 1e-5, $"token {t}: {Fixtures.RelError(got[t], want):E2}");
        }
    }

    /// <summary>Llama's rope at one position: v·cos + rotate_half(v)·sin, angles pos / 10000^(2i/d).</summary>
    static Tensor Rope(Tensor v, long pos, long d)
    {
        var angles = (pos * pow(10000.0, -arange(0, d, 2, ScalarType.Float64) / d)).to(ScalarType.Float32);
        var cos = cat([angles.cos(), angles.cos()]);
        var sin = cat([angles.sin(), angles.sin()]);
        var halves = v.chunk(2, -1);
        return v * cos + cat([-halves[1], halves[0]], -1) * sin;
    }

    // Rope is relative and the routing per token, so a left-padded row must give what its tokens give alone.
    [Fact]
    public void LeftPaddedRowEqualsTheRowAlone()
        => RuntimeChecks.PaddedRowEqualsTheRowAlone(Config);

    static List<(string Name, TorchSharp.Modules.Parameter Param)> InjectAllLinearAndExperts(CausalLm model) => RuntimeChecks.InjectWithNonZeroB(model, """
        {"r": 2, "lora_alpha": 4, "target_modules": "all-linear", "target_parameters": ["input_linear.weight", "output_linear.weight"]}
        """);

    [Fact]
    public void LoraGradientsReachEveryAdapter()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 3));
        var lora = InjectAllLinearAndExperts(h.Model);
        foreach (var module in new[] { "self_attention.kv_proj", "self_attention.experts.router.layer", "mlp.router.layer",
                     "self_attention.experts.input_linear", "self_attention.experts.output_linear", "mlp.input_linear", "mlp.output_linear" })
            Assert.Contains(lora, p => p.Name.Contains($"layers.1.{module}.lora_A", StringComparison.Ordinal)
                || p.Name.Contains($"layers.1.{module}.base_layer.lora_A", StringComparison.Ordinal));
        RuntimeChecks.EveryAdapterGetsGradient(h.Model, lora);
    }

    // The grouped dispatch applies the expert adapters as low-rank products; the loop uses W + ΔW (PEFT's parametrization).
    [Fact]
    public void GroupedExpertsEqualTheLoopWithAdapters()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 4));
        InjectAllLinearAndExperts(h.Model);
        using var _ = no_grad();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var grouped = h.Model.Forward(ids, mask);
        h.Model.SetExpertDispatch(ExpertDispatch.Loop);
        using var loop = h.Model.Forward(ids, mask);
        var err = Fixtures.MaskedRelError(grouped.Logits, loop.Logits, mask);
        Assert.True(err < 1e-5, $"grouped vs loop: {err:E2}");
        Assert.True(Fixtures.MaskedRelError(grouped.Logits, loop.Logits * 1.01, mask) > 1e-4);
    }

    // One routing per gating: the MoE's and the attention experts' input_linear report what their routers chose
    // (k pairs per real or padded token); each output_linear runs on that same routing and is not listed again.
    [Fact]
    public void EachGatingReportsItsExpertCountsOnce()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 6));
        using var _ = no_grad();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var o = h.Model.Forward(ids, mask);
        var rows = h.Model.NamedModules().Where(m => m.Module is IRoutedExperts { SharesRouting: false }).ToList();
        Assert.Equal(["model.layers.0.mlp.input_linear", "model.layers.0.self_attention.experts.input_linear",
            "model.layers.1.mlp.input_linear", "model.layers.1.self_attention.experts.input_linear"], rows.Select(r => r.Name));
        Assert.All(rows, r => Assert.Equal(ids.numel() * 2, ((IRoutedExperts)r.Module).LastSelectedCounts!.Sum()));
        Assert.Equal(4, h.Model.NamedModules().Count(m => m.Module is IRoutedExperts { SharesRouting: true }));
    }
}
