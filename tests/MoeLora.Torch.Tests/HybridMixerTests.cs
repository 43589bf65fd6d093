using System.Text.Json.Nodes;
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
/// The hybrid mixers beyond what the hf-moe parity fixtures reach: the Mamba-2 SSD scan across several chunks (the
/// fixture's 10 tokens fit one chunk of 128), and LoRA training through the short convolution and the scan.
/// </summary>
[Collection(TorchGlobalRng.Name)]
public class HybridMixerTests
{
    public HybridMixerTests() => TorchRuntime.EnsureInitialized();

    static string Fixture(string type) => Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe", type);

    /// <summary>h_t = exp(a_t) h_{t−1} + x_t ⊗ B_t, y_t = h_t · C_t, one step at a time (the definition the chunks reorder).</summary>
    static Tensor Sequential(Tensor x, Tensor a, Tensor bm, Tensor cm)
    {
        long b = x.shape[0], l = x.shape[1], h = x.shape[2], p = x.shape[3], n = bm.shape[3];
        var state = zeros([b, h, p, n], x.dtype);
        var ys = new List<Tensor>();
        for (long t = 0; t < l; t++)
        {
            state = state * a[.., t].exp().view(b, h, 1, 1) + x[.., t].unsqueeze(-1) * bm[.., t].unsqueeze(2);
            ys.Add(einsum("bhpn,bhn->bhp", state, cm[.., t]));
        }
        return stack(ys, 1);
    }

    [Theory]
    [InlineData(1)]
    [InlineData(3)]
    [InlineData(4)]
    [InlineData(10)]
    [InlineData(128)]
    public void ChunkedScanEqualsTheRecurrence(long chunk)
    {
        using var scope = NewDisposeScope();
        var gen = new Generator(7);
        var x = randn([2, 10, 3, 4], ScalarType.Float64, generator: gen);
        var a = -rand([2, 10, 3], ScalarType.Float64, generator: gen);   // A·dt ≤ 0, as A = −exp(A_log) and dt > 0
        var bm = randn([2, 10, 3, 5], ScalarType.Float64, generator: gen);
        var cm = randn([2, 10, 3, 5], ScalarType.Float64, generator: gen);
        var expected = Sequential(x, a, bm, cm);
        var err = Fixtures.RelError(Mamba2Mixer.Ssd(x, a, bm, cm, chunk), expected);
        Assert.True(err < 1e-12, $"chunk {chunk}: {err:E2}");
    }

    [Fact]
    public void NemotronHWithSmallChunksStillMatchesTransformers()
    {
        // The fixture's checkpoint with chunk_size 3: the scan now carries state across four chunks of the 10 tokens.
        var dir = Path.Combine(Fixture("nemotron_h"), "model");
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!.AsObject();
        config["chunk_size"] = 3;
        var reference = Safetensors.Load(Path.Combine(Fixture("nemotron_h"), "reference.safetensors"));
        using var h = new DisposableModel(TorchModelFactory.Load(config.ToJsonString(), dir));
        using var _ = no_grad();
        using var o = h.Model.Forward(reference["input_ids"], reference["attention_mask"]);
        var err = Fixtures.MaskedRelError(o.Logits, reference["logits"], reference["attention_mask"]);
        Assert.True(err < 1e-5, $"logits {err:E2}");
    }

    // PEFT refuses out_proj (and conv1d) on Mamba models (Core reproduces its error), so Nemotron-H adapts in_proj only.
    [Theory]
    [InlineData("lfm2_moe", "model.layers.0.conv", """{"r": 2, "lora_alpha": 4, "target_modules": ["in_proj", "out_proj", "q_proj", "w1"]}""")]
    [InlineData("nemotron_h", "model.layers.0.mixer",
        """{"r": 2, "lora_alpha": 4, "target_modules": ["in_proj", "q_proj"], "target_parameters": ["mixer.experts.up_proj"]}""")]
    public void LoraTrainsThroughTheMixers(string type, string mixer, string loraConfig)
    {
        using var h = new DisposableModel(TorchModelFactory.Load(Path.Combine(Fixture(type), "model")));
        var reference = Safetensors.Load(Path.Combine(Fixture(type), "reference.safetensors"));
        var adapter = LoraInjector.Inject(h.Model, LoraInjector.Plan(h.Model, loraConfig));
        Assert.Contains(adapter.Wrappers, w => w.Module == mixer + ".in_proj");
        if (loraConfig.Contains("out_proj", StringComparison.Ordinal)) Assert.Contains(adapter.Wrappers, w => w.Module == mixer + ".out_proj");
        var lora = LoraInjector.PeftNamedParameters(h.Model).Where(p => p.Param.requires_grad).ToList();
        Assert.NotEmpty(lora);
        // B starts at zero (PEFT's init), which would leave A without gradient: give B values first.
        using (no_grad())
            foreach (var (name, p) in lora)
                if (name.Contains(".lora_B.", StringComparison.Ordinal)) p.normal_(0, 0.1, generator: new Generator(3));

        using var o = h.Model.Forward(reference["input_ids"], reference["attention_mask"]);
        var loss = (o.Logits * reference["attention_mask"].unsqueeze(-1)).pow(2).mean();
        loss.backward();
        foreach (var (name, p) in lora)
        {
            var g = p.grad;
            Assert.True(g is not null, $"{name}: no gradient");
            Assert.False(g!.isnan().any().item<bool>(), $"{name}: NaN gradient");
            Assert.True(g.abs().sum().item<float>() > 0, $"{name}: zero gradient");
        }
        // The first layer's mixer input projection gets its gradient only through the scan (or convolution) after it.
        Assert.Contains(lora, p => p.Name.Contains($"{mixer}.in_proj.lora_A", StringComparison.Ordinal));
    }

    // bfloat16 runs the same code with the scan in fp32 (as transformers casts x, B, C up); only rounding differs. The
    // first layer is a mixer layer in these fixtures; deeper, a MoE may send a token to another expert in bf16 (one
    // token in lfm2_moe's fixture), which moves the logits far more than rounding, so only layer 0 is compared.
    [Theory]
    [InlineData("lfm2_moe")]
    [InlineData("nemotron_h")]
    [InlineData("jamba")]
    public void BFloat16MixerLayerStaysCloseToTheFp32Reference(string type)
    {
        var reference = Safetensors.Load(Path.Combine(Fixture(type), "reference.safetensors"));
        using var h = new DisposableModel(TorchModelFactory.Load(Path.Combine(Fixture(type), "model"), ScalarType.BFloat16));
        using var _ = no_grad();
        using var o = h.Model.Forward(reference["input_ids"], reference["attention_mask"], outputHiddenStates: true);
        Assert.Equal(ScalarType.BFloat16, o.HiddenStates[1].dtype);
        var err = Fixtures.MaskedRelError(o.HiddenStates[1], reference["hidden_states"][1], reference["attention_mask"]);
        Assert.True(err < 2e-2, $"hidden_states[1] {err:E2}");
        Assert.False(o.Logits.isnan().any().item<bool>() || o.Logits.isinf().any().item<bool>(), "non-finite logits");
    }

    // Circuit-breaker training loads only the blocks up to its deepest target layer.
    [Theory]
    [InlineData("lfm2_moe")]
    [InlineData("nemotron_h")]
    [InlineData("jamba")]
    public void TruncatedLoadKeepsTheFirstBlocks(string type)
    {
        var reference = Safetensors.Load(Path.Combine(Fixture(type), "reference.safetensors"));
        using var h = new DisposableModel(TorchModelFactory.LoadTruncated(Path.Combine(Fixture(type), "model"), 2));
        Assert.Equal(2, h.Model.NumLayers);
        using var _ = no_grad();
        using var o = h.Model.Forward(reference["input_ids"], reference["attention_mask"], outputHiddenStates: true);
        var err = Fixtures.MaskedRelError(o.HiddenStates[1], reference["hidden_states"][1], reference["attention_mask"]);
        Assert.True(err < 1e-5, $"hidden_states[1] {err:E2}");
    }

    /// <summary>
    /// A tiny GraniteMoeHybrid (Mamba, then attention without rope, MoE and shared MLP on both). Its runtime has no
    /// transformers fixture; its parameter names are checked against transformers' by RuntimeTreeTests.
    /// </summary>
    const string GraniteHybrid = """
        {"model_type": "granitemoehybrid", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "shared_intermediate_size": 24,
         "layer_types": ["mamba", "attention"], "mamba_n_heads": 4, "mamba_n_groups": 2, "mamba_d_state": 8, "mamba_d_conv": 4,
         "mamba_expand": 2, "mamba_chunk_size": 4, "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 4.0,
         "attention_multiplier": 0.25, "time_step_limit": [0.0, "inf"], "initializer_range": 0.1}
        """;

    // Without rope nothing in this model depends on position ids, and the Mamba layer zeroes padded positions before its
    // convolution and scan, so a left-padded row must give exactly what its tokens give alone. Fails if the padding
    // leaked into the convolution or the carried state.
    [Fact]
    public void GraniteHybridLeftPaddedRowEqualsTheRowAlone()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(GraniteHybrid, 5));
        using var _ = no_grad();
        var tokens = tensor(new long[] { 5, 9, 13, 2, 40, 7 }).unsqueeze(0);
        var padded = cat([tensor(new long[] { 0, 0, 0 }).unsqueeze(0), tokens], 1);
        var ids = cat([tensor(new long[] { 3, 4, 5, 6, 7, 8, 9, 10, 11 }).unsqueeze(0), padded], 0);
        var mask = tensor(new long[,] { { 1, 1, 1, 1, 1, 1, 1, 1, 1 }, { 0, 0, 0, 1, 1, 1, 1, 1, 1 } });
        using var batch = h.Model.Forward(ids, mask);
        using var alone = h.Model.Forward(tokens);
        var err = Fixtures.RelError(batch.Logits[1, 3..], alone.Logits[0]);
        Assert.True(err < 1e-5, $"padded row vs alone: {err:E2}");
        Assert.Equal(2, batch.RouterLogits.Count);
    }

    // merge writes the checkpoint's own layout back: LFM2's per-expert w1/w3/w2, Nemotron-H's backbone.* names and
    // per-expert up_proj / down_proj of its non-gated experts, Jamba's per-expert JambaMLPs.
    [Theory]
    [InlineData("lfm2_moe", """{"target_modules": ["in_proj", "out_proj"], "target_parameters": ["feed_forward.experts.gate_up_proj"], "r": 2, "lora_alpha": 4, "init_lora_weights": false}""")]
    [InlineData("nemotron_h", """{"target_modules": ["in_proj"], "target_parameters": ["mixer.experts.up_proj", "mixer.experts.down_proj"], "r": 2, "lora_alpha": 4, "init_lora_weights": false}""")]
    [InlineData("jamba", """{"target_modules": ["in_proj", "x_proj", "out_proj", "router"], "target_parameters": ["feed_forward.experts.gate_up_proj"], "r": 2, "lora_alpha": 4, "init_lora_weights": false}""")]
    public void MergedCheckpointGivesTheAdaptedLogits(string type, string loraConfig)
    {
        var modelDir = Path.Combine(Fixture(type), "model");
        var inputs = Safetensors.Load(Path.Combine(Fixture(type), "reference.safetensors"));
        using var dir = new TempDir();
        using var adapted = new DisposableModel(TorchModelFactory.Load(modelDir));
        LoraInjector.Inject(adapted.Model, LoraInjector.Plan(File.ReadAllText(Path.Combine(modelDir, "config.json")), loraConfig), seed: 2);
        adapted.Model.Eval();
        using var _ = no_grad();
        using var want = adapted.Model.Forward(inputs["input_ids"], inputs["attention_mask"]);
        Assert.True(Fixtures.MaskedRelError(want.Logits, inputs["logits"], inputs["attention_mask"]) > 1e-4, "the adapter changes nothing");

        var outDir = Path.Combine(dir.Path, "merged");
        LoraMerge.SaveHubCheckpoint(adapted.Model, modelDir, outDir);
        var (before, _, _) = Safetensors.ReadHeader(Path.Combine(modelDir, "model.safetensors"));
        var (after, _, _) = Safetensors.ReadHeader(Path.Combine(outDir, "model.safetensors"));
        Assert.Equal(before.Select(e => (e.Name, string.Join(",", e.Shape))), after.Select(e => (e.Name, string.Join(",", e.Shape))));
        using var merged = new DisposableModel(TorchModelFactory.Load(outDir));
        using var got = merged.Model.Forward(inputs["input_ids"], inputs["attention_mask"]);
        var err = Fixtures.MaskedRelError(got.Logits, want.Logits, inputs["attention_mask"]);
        Assert.True(err <= 1e-5, $"merged logits differ by {err:E2}");
    }
}
