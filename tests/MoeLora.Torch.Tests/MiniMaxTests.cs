using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// MiniMax-Text-01 (<c>minimax</c>): lightning attention's block form against the token-by-token recurrence over
/// several blocks (the parity fixture's 10 tokens fit in its one 256-position block), the decay tables against those
/// transformers saved, the residuals taken after the norms with their alpha / beta factors, left padding across block
/// boundaries, and LoRA on both attentions and the experts.
/// </summary>
[Collection(TorchGlobalRng.Name)]
public class MiniMaxTests(ITestOutputHelper log)
{
    static string Data(params string[] parts) => Path.Combine([AppContext.BaseDirectory, "Data", "hf-moe", "minimax", .. parts]);

    // Blocks of 4 positions, so the 9-token test batch spans three; non-unit residual factors.
    const string Config = """
        {"model_type": "minimax", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
         "block_size": 4, "initializer_range": 0.1, "full_attn_alpha_factor": 0.9, "full_attn_beta_factor": 1.3,
         "linear_attn_alpha_factor": 1.1, "linear_attn_beta_factor": 0.7, "mlp_alpha_factor": 0.8, "mlp_beta_factor": 1.2}
        """;

    /// <summary>
    /// The recurrence transformers' cached decoding runs, in fp64: <c>S_t = exp(−slope) · S_{t−1} + k_tᵀ v_t</c>,
    /// <c>o_t = q_t S_t</c> per head.
    /// </summary>
    static Tensor Recurrent(Tensor q, Tensor k, Tensor v, Tensor slope)
    {
        long b = q.shape[0], h = q.shape[1], s = q.shape[2], d = q.shape[3];
        var ratio = (-slope.to(ScalarType.Float64)).exp();                       // [H, 1, 1]
        var state = zeros(b, h, d, v.shape[3], ScalarType.Float64);
        var outs = new List<Tensor>();
        for (long t = 0; t < s; t++)
        {
            var kt = k.narrow(2, t, 1).to(ScalarType.Float64);                   // [B, H, 1, D]
            var vt = v.narrow(2, t, 1).to(ScalarType.Float64);
            state = ratio * state + kt.transpose(-1, -2) * vt;                   // outer product kᵀv
            outs.Add((q.narrow(2, t, 1).to(ScalarType.Float64).transpose(-1, -2) * state).sum(-2, keepdim: true));
        }
        return cat(outs, 2);
    }

    [Theory]
    [InlineData(11, 4, 1)]   // three blocks, the last of 3 positions
    [InlineData(8, 4, 0)]    // two whole blocks; the first layer's slopes
    [InlineData(5, 16, 3)]   // one partial block; the last layer's (smallest) slopes
    public void BlockFormEqualsTheTokenByTokenRecurrence(int seq, int blockSize, int layer)
    {
        TorchRuntime.EnsureInitialized();
        var gen = new TorchSharp.torch.Generator(11);
        var q = randn([2, 4, seq, 8], generator: gen);
        var k = randn([2, 4, seq, 8], generator: gen);
        var v = randn([2, 4, seq, 8], generator: gen);
        var slope = LightningAttention.SlopeRate(4, layer, 4);
        var (qd, kd, dd) = LightningAttention.DecayFactors(slope, blockSize);
        var blocks = LightningAttention.BlockForm(q, k, v, slope, qd, kd, dd);
        var reference = Recurrent(q, k, v, slope);
        var err = Fixtures.RelError(blocks.to(ScalarType.Float64), reference);
        log.WriteLine($"S={seq} block={blockSize} layer={layer}: {err:E2}");
        Assert.Equal(new long[] { 2, 4, seq, 8 }, blocks.shape);
        Assert.True(err < 1e-5, $"block form vs recurrence {err:E2}");
    }

    // The slopes and decay tables a random model computes are the buffers transformers saved with the fixture
    // (layers 1 and 3 are its lightning-attention layers).
    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    public void DecayTablesEqualTransformersBuffers(int layer)
    {
        TorchRuntime.EnsureInitialized();
        var stored = IO.Safetensors.Load(Data("model", "model.safetensors"));
        var slope = LightningAttention.SlopeRate(4, layer, 4);
        var (qd, kd, dd) = LightningAttention.DecayFactors(slope, 256);
        foreach (var (name, mine) in new[] { ("slope_rate", slope), ("query_decay", qd), ("key_decay", kd), ("diagonal_decay", dd) })
        {
            var theirs = stored[$"model.layers.{layer}.self_attn.{name}"];
            Assert.Equal(theirs.shape, mine.shape);
            var err = (mine - theirs).abs().max().item<float>();
            Assert.True(err <= 1e-7 * Math.Max(1, theirs.abs().max().item<float>()), $"{name}: {err:E2}");
        }
    }

    // The decay tables are derived from the config: a checkpoint without them loads (transformers' _init_weights
    // recomputes them) and gives the fixture's logits; a checkpoint missing a weight is still refused.
    [Fact]
    public void CheckpointWithoutTheDecayBuffersLoads()
    {
        TorchRuntime.EnsureInitialized();
        using var dir = new Training.TempDir();
        var model = Directory.CreateDirectory(Path.Combine(dir.Path, "model")).FullName;
        File.Copy(Data("model", "config.json"), Path.Combine(model, "config.json"));
        var stored = IO.Safetensors.Load(Data("model", "model.safetensors"));
        var decays = new[] { "slope_rate", "query_decay", "key_decay", "diagonal_decay" };
        var kept = stored.Where(kv => !decays.Any(d => kv.Key.EndsWith("." + d, StringComparison.Ordinal))).ToList();
        Assert.Equal(stored.Count - 8, kept.Count);
        IO.Safetensors.Save(Path.Combine(model, "model.safetensors"), kept);

        var reference = IO.Safetensors.Load(Data("reference.safetensors"));
        var mask = reference["attention_mask"];
        using (var h = new DisposableModel(TorchModelFactory.Load(model)))
        using (no_grad())
        {
            using var o = h.Model.Forward(reference["input_ids"], mask);
            var err = Fixtures.MaskedRelError(o.Logits, reference["logits"], mask);
            Assert.True(err < 1e-5, $"logits without stored decay tables: {err:E2}");
        }

        IO.Safetensors.Save(Path.Combine(model, "model.safetensors"), kept.Where(kv => kv.Key != "model.layers.1.self_attn.qkv_proj.weight"));
        var e = Assert.ThrowsAny<Exception>(() => TorchModelFactory.Load(model));
        Assert.Contains("qkv_proj", e.Message, StringComparison.Ordinal);
    }

    // With every beta 0 a layer is its norms and alphas alone: out = α₂ · norm(α₁ · norm(x)) (unit norm weights), so
    // the residual is the norm's output, not the layer's input.
    [Fact]
    public void ResidualsAreTheNormOutputsWeightedByAlpha()
    {
        TorchRuntime.EnsureInitialized();
        const string config = """
            {"model_type": "minimax", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 24, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2,
             "block_size": 4, "initializer_range": 0.1, "rms_norm_eps": 1e-5, "full_attn_alpha_factor": 3.0, "full_attn_beta_factor": 0,
             "linear_attn_beta_factor": 0, "mlp_alpha_factor": 0.5, "mlp_beta_factor": 0}
            """;
        using var h = new DisposableModel(TorchModelFactory.Random(config, 2));
        using var _ = no_grad();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var o = h.Model.Forward(ids, mask, outputHiddenStates: true);
        var x = o.HiddenStates[0];
        var expected = RmsNorm.Normalize(RmsNorm.Normalize(x, 1e-5) * 3.0, 1e-5) * 0.5;
        var err = Fixtures.RelError(o.HiddenStates[1], expected);
        Assert.True(err < 1e-6, $"layer 0 with zero betas: {err:E2}");
        // The betas do weight the sublayers: with the default 1 the output moves.
        using var d = new DisposableModel(TorchModelFactory.Random(config.Replace("\"mlp_beta_factor\": 0", "\"mlp_beta_factor\": 1"), 2));
        using var od = d.Model.Forward(ids, mask, outputHiddenStates: true);
        Assert.True(Fixtures.RelError(od.HiddenStates[1], expected) > 1e-3);
    }

    // Padding enters lightning attention as zeros and the decay is relative, so the padded row (crossing block
    // boundaries at other offsets than the row alone) gives what its tokens give alone.
    [Fact]
    public void LeftPaddedRowEqualsTheRowAlone()
    {
        TorchRuntime.EnsureInitialized();
        RuntimeChecks.PaddedRowEqualsTheRowAlone(Config);
    }

    [Fact]
    public void LoraGradientsReachEveryAdapter()
    {
        TorchRuntime.EnsureInitialized();
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 3));
        var lora = RuntimeChecks.InjectWithNonZeroB(h.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": "all-linear", "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
            """);
        // Layer 1 is lightning attention, layer 0 softmax attention; both and the experts carry adapters.
        foreach (var module in new[] { "1.self_attn.qkv_proj", "1.self_attn.output_gate", "1.self_attn.out_proj", "0.self_attn.q_proj", "0.self_attn.o_proj", "1.mlp.experts" })
            Assert.Contains(lora, p => p.Name.Contains($".model.layers.{module}.", StringComparison.Ordinal) && p.Name.Contains("lora_A", StringComparison.Ordinal));
        RuntimeChecks.EveryAdapterGetsGradient(h.Model, lora);
    }
}
