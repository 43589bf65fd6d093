using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Tests.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// Jamba's Mamba-1 mixer beyond the hf-moe parity fixture (whose conv biases are zero and A_log / D at their initial
/// values): the selective scan against its closed form, padding with non-zero conv biases, and LoRA through the mixer.
/// </summary>
[Collection(TorchGlobalRng.Name)]
public class JambaTests
{
    public JambaTests() => TorchRuntime.EnsureInitialized();

    // Mamba layers 0 and 2, attention (no rope) at 1 and 3; MoE at 1 and 3, dense JambaMLP at 0 and 2.
    const string Config = """
        {"model_type": "jamba", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
         "attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1,
         "mamba_d_state": 8, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": 4, "mamba_conv_bias": true,
         "initializer_range": 0.1}
        """;

    /// <summary>
    /// The unrolled recurrence: <c>y_t = Σ_{s≤t} Σ_n C_t[n] · exp(A[d, n] · Σ_{s&lt;k≤t} dt_k[d]) · dt_s[d] · B_s[n] · x_s[d]</c>,
    /// all pairs (t, s) at once, in float64.
    /// </summary>
    static Tensor ClosedForm(Tensor x, Tensor dt, Tensor a, Tensor bm, Tensor cm)
    {
        long l = x.shape[1];
        var cum = dt.cumsum(1);                                                                     // [b, l, d]
        var gap = cum.unsqueeze(2) - cum.unsqueeze(1);                                             // [b, t, s, d]
        var decay = (gap.unsqueeze(-1) * a).exp();                                                 // [b, t, s, d, n]
        var causal = ones(l, l, ScalarType.Bool).tril().view(1, l, l, 1, 1);
        decay = decay.masked_fill(causal.logical_not(), 0);
        var input = (dt * x).unsqueeze(-1) * bm.unsqueeze(2);                                      // [b, s, d, n]
        return einsum("btsdn,bsdn,btn->btd", decay, input, cm);
    }

    [Fact]
    public void SelectiveScanEqualsItsClosedForm()
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(11);
        var x = randn([2, 7, 5], ScalarType.Float64, generator: gen);
        var dt = rand([2, 7, 5], ScalarType.Float64, generator: gen);                  // softplus output: positive
        var a = -rand([5, 3], ScalarType.Float64, generator: gen) * 2;                  // A = −exp(A_log) < 0
        var bm = randn([2, 7, 3], ScalarType.Float64, generator: gen);
        var cm = randn([2, 7, 3], ScalarType.Float64, generator: gen);
        var expected = ClosedForm(x, dt, a, bm, cm);
        var got = MambaMixer.SelectiveScan(x.to(ScalarType.Float32), dt.to(ScalarType.Float32), a.to(ScalarType.Float32),
            bm.to(ScalarType.Float32), cm.to(ScalarType.Float32));
        var err = Fixtures.RelError(got.to(ScalarType.Float64), expected);
        Assert.True(err < 1e-5, $"scan vs closed form: {err:E2}");
    }

    // No rope: nothing depends on position ids. With non-zero conv biases a padded position's convolution output is
    // act(bias) ≠ 0, so the row equals its tokens alone only if the mixer zeroes padded positions after the convolution
    // (transformers' second apply_mask_to_padding_states), not just before in_proj.
    [Fact]
    public void LeftPaddedRowEqualsTheRowAloneWithConvBiases()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 5));
        var mixers = h.Model.NamedModules().Select(m => m.Module).OfType<MambaMixer>().ToList();
        Assert.Equal(2, mixers.Count);
        using (no_grad())
        {
            var gen = new Generator(9);
            foreach (var m in mixers)
            {
                m.conv1d.bias!.copy_(randn(m.conv1d.bias.shape, generator: gen));
                m.A_log.add_(randn(m.A_log.shape, generator: gen) * 0.5);
                m.D.copy_(randn(m.D.shape, generator: gen));
            }
        }
        RuntimeChecks.PaddedRowEqualsTheRowAlone(h.Model);
    }

    // The mixer multiplies by dt_proj.weight itself (as transformers does), so dt_proj's adapter, which all-linear
    // creates as PEFT does, never acts: its tensors get no gradient. Every other adapter does, the router's included.
    [Fact]
    public void LoraGradientsReachEveryAdapterButDtProj()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 3));
        var (_, grads) = RuntimeChecks.LoraStep(h.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": "all-linear",
             "target_parameters": ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]}
            """);
        foreach (var module in new[] { "0.mamba.in_proj", "0.mamba.x_proj", "0.mamba.dt_proj", "0.mamba.out_proj", "0.feed_forward.gate_proj",
                     "1.self_attn.q_proj", "1.feed_forward.router", "1.feed_forward.experts" })
            Assert.Contains(grads.Keys, k => k.Contains($".layers.{module}.lora_A", StringComparison.Ordinal));
        RuntimeChecks.AssertGradients(grads, name => name.Contains(".mamba.dt_proj.", StringComparison.Ordinal));
    }
}
