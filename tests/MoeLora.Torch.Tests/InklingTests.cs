using MoeLora.Core.Architectures.Runtime;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Tests.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// inkling_text beyond its transformers fixture (MoeTypesParityTests, whose layers are all sparse, whose window and
/// bias banks are longer than its 10 tokens and which has no log scaling): a dense layer, a sliding window and bias
/// banks shorter than the batch, the relative-position bias and the router against direct formulas, left padding, LoRA;
/// and inkling_mm_model's checkpoint layout with gate and up rows interleaved.
/// </summary>
public class InklingTests
{
    public InklingTests() => TorchRuntime.EnsureInitialized();

    static string ConfigWith(string extra) => """
        {"model_type": "inkling_text", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rel_extent": 6,
         "swa_num_attention_heads": 2, "swa_num_key_value_heads": 1, "swa_head_dim": 16, "sliding_window_size": 4,
         "d_rel": 3, "conv_kernel_size": 3, "intermediate_size": 24, "moe_intermediate_size": 16,
         "n_routed_experts": 4, "n_shared_experts": 2, "num_experts_per_tok": 2, "route_scale": 2.5,
         "layer_types": ["hybrid_sliding", "hybrid", "hybrid_sliding"], "mlp_layer_types": ["dense", "sparse", "sparse"],
         "initializer_range": 0.1 EXTRA}
        """.Replace("EXTRA", extra, StringComparison.Ordinal);

    static readonly string Config = ConfigWith("");

    [Fact]
    public void ParametersEqualCoresTree() => RuntimeChecks.ParametersEqualCoresTree(Config);

    /// <summary>The bias depends on distances only and the convolutions see zeros at padding, as causal padding would be.</summary>
    [Fact]
    public void LeftPaddedRowEqualsTheRowAlone() => RuntimeChecks.PaddedRowEqualsTheRowAlone(Config);

    /// <summary>bias[b, h, i, j] = Σ_r rel[b, i, h, r] · proj[r, i − j] for 0 ≤ i − j &lt; extent, else 0.</summary>
    [Fact]
    public void RelativeBiasReadsTheBankAtEachBackwardDistance()
    {
        const long b = 2, s = 7, heads = 3, dRel = 2, extent = 4;
        var init = new Init(ScalarType.Float64, CPU, 0.5, new Generator(11));
        var module = new InklingRelativeLogits(dRel, extent, init);
        var rel = randn(new long[] { b, s, heads, dRel }, ScalarType.Float64, generator: new Generator(12));
        var got = module.Forward(rel);
        Assert.Equal(new[] { b, heads, s, s }, got.shape);
        var want = zeros(new long[] { b, heads, s, s }, ScalarType.Float64);
        for (long n = 0; n < b; n++)
            for (long h = 0; h < heads; h++)
                for (long i = 0; i < s; i++)
                    for (long j = Math.Max(0, i - extent + 1); j <= i; j++)
                        want[n, h, i, j] = (rel[n, i, h] * module.proj[.., i - j]).sum();
        Assert.True(Fixtures.RelError(got, want) < 1e-12, "bias differs from the bank read at each distance");
    }

    /// <summary>
    /// The softmax of log-sigmoids is sigmoid over its sum: each chosen routed and each shared expert weighs
    /// sigmoid(logit) / Σ sigmoid · route_scale · global_scale. The selection bias changes the choice, not the weights.
    /// </summary>
    [Fact]
    public void RouterWeightsAreNormalisedSigmoidsOfTheChosenAndSharedExperts()
    {
        var s = new InklingMoeSettings(NumExperts: 4, SharedExperts: 2, TopK: 2, Intermediate: 8, Act: "silu", RouteScale: 2.5);
        var moe = new InklingMoe(6, s, new Init(ScalarType.Float64, CPU, 0.5, new Generator(5)));
        using (no_grad())
        {
            moe.gate.weight.copy_(eye(6, dtype: ScalarType.Float64));         // logits = the input itself
            moe.gate.global_scale.fill_(0.5);
            // Expert 0 has the lowest score but a bias that makes it chosen.
            moe.gate.SelectionBias.copy_(tensor(new float[] { 1f, 0f, 0f, 0f }));
        }
        var logits = tensor(new double[,] { { -2.0, 0.5, 1.5, 0.25, -0.3, 0.8 } });
        var (topW, topIdx, gammas) = moe.Route(logits);
        Assert.Equal(new long[] { 0, 2 }, topIdx[0].data<long>().ToArray().Order().ToArray());
        var chosen = new[] { -2.0, 1.5, -0.3, 0.8 }.Select(x => 1 / (1 + Math.Exp(-x))).ToArray();
        var scale = 2.5 * 0.5 / chosen.Sum();
        var byExpert = topIdx[0].data<long>().ToArray().Zip(topW[0].data<double>().ToArray()).ToDictionary(p => p.First, p => p.Second);
        Assert.Equal(chosen[0] * scale, byExpert[0], 12);
        Assert.Equal(chosen[1] * scale, byExpert[2], 12);
        Assert.Equal(chosen[2] * scale, gammas[0, 0].item<double>(), 12);
        Assert.Equal(chosen[3] * scale, gammas[0, 1].item<double>(), 12);
    }

    /// <summary>
    /// log_scaling_n_floor at or beyond the batch length leaves every tau at 1 (the unscaled model); a smaller floor
    /// scales the global layer's later queries and bias rows and so its outputs from position n_floor on.
    /// </summary>
    [Fact]
    public void LogScalingActsFromTheFloorOn()
    {
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        Tensor Logits(string extra)
        {
            using var h = new DisposableModel(TorchModelFactory.Random(ConfigWith(extra), 7));
            using var _ = no_grad();
            using var o = h.Model.Forward(ids[..1], mask[..1]);
            return o.Logits.clone();
        }
        var plain = Logits("");
        Assert.True(Fixtures.RelError(Logits(""", "log_scaling_n_floor": 9"""), plain) < 1e-6);
        var scaled = Logits(""", "log_scaling_n_floor": 4, "log_scaling_alpha": 0.5""");
        Assert.True(Fixtures.RelError(scaled[0, ..4], plain[0, ..4]) < 1e-6, "positions before the floor changed");
        Assert.True(Fixtures.RelError(scaled[0, 4..], plain[0, 4..]) > 1e-4, "positions from the floor on did not change");
    }

    /// <summary>In bf16 the short convolutions keep fp32 weights (as transformers does) and the logits stay near the fp32 reference.</summary>
    [Fact]
    public void LoadsInBFloat16WithFp32Convolutions()
    {
        var dir = Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe", "inkling_text");
        using var m = new DisposableModel(TorchModelFactory.Load(Path.Combine(dir, "model"), ScalarType.BFloat16));
        var parameters = m.Model.NamedParameters().ToList();
        Assert.All(parameters.Where(p => p.Name.Contains("sconv.", StringComparison.Ordinal)), p => Assert.Equal(ScalarType.Float32, p.Param.dtype));
        Assert.Equal(ScalarType.BFloat16, parameters.Single(p => p.Name == "model.layers.0.self_attn.q_proj.weight").Param.dtype);
        var reference = IO.Safetensors.Load(Path.Combine(dir, "reference.safetensors"));
        using var _ = no_grad();
        using var o = m.Model.Forward(reference["input_ids"], reference["attention_mask"]);
        Assert.Equal(ScalarType.BFloat16, o.Logits.dtype);
        Assert.True(Fixtures.MaskedRelError(o.Logits, reference["logits"], reference["attention_mask"]) < 5e-2);
    }

    [Fact]
    public void LoraGradientsReachEveryAdapter()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 3));
        var (_, grads) = RuntimeChecks.LoraStep(h.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": "all-linear",
             "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.shared_experts.gate_proj",
                                   "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj", "mlp.gate.weight"]}
            """);
        foreach (var name in new[] { "self_attn.r_proj.lora_A", "layers.1.self_attn.q_proj.lora_B", "layers.0.mlp.gate_proj.lora_A",
                     "mlp.experts.lora_A", "mlp.shared_experts.lora_A", "mlp.gate.lora_A" })
            Assert.Contains(grads.Keys, n => n.Contains(name, StringComparison.Ordinal));
        RuntimeChecks.AssertGradients(grads);
    }

    /// <summary>
    /// inkling_mm_model's checkpoints store gate and up as one tensor of alternating rows (routed experts' w13_weight,
    /// shared experts' shared_w13_weight, a dense MLP's w13_dn): a random multimodal model with a dense layer, written in
    /// the checkpoint layout with rows 2i = gate[i], 2i + 1 = up[i] (transformers' inverse Interleave), loads back equal.
    /// </summary>
    [Fact]
    public void MultimodalCheckpointWithInterleavedGateUpRowsLoadsBack()
    {
        var configPath = Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe", "inkling_mm_model", "model", "config.json");
        var root = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(configPath))!.AsObject();
        root["text_config"]!["mlp_layer_types"] = new System.Text.Json.Nodes.JsonArray("dense", "sparse", "sparse", "sparse");
        var config = root.ToJsonString();
        using var original = new DisposableModel(TorchModelFactory.Random(config, 7));
        var spec = original.Model.Spec;
        var layout = Core.Modules.CheckpointLayout.For(spec)!;
        var diskNames = Core.Architectures.ArchitectureRegistry.Build(spec.Config, Core.Modules.Layout.V4).Tree.Modules
            .SelectMany(m => m.Parameters.Concat(m.Buffers)).Select(p => p.Name).ToHashSet();

        // Rows 2i = gate[i], 2i + 1 = up[i], written out here rather than with the product's CheckpointLoader.Interleave.
        static Tensor Interleave(Tensor gate, Tensor up) => stack([gate, up], gate.dim() - 1).flatten(gate.dim() - 2, gate.dim() - 1);
        var stored = new Dictionary<string, Tensor>();
        var halves = new Dictionary<string, (Tensor? Gate, Tensor? Up)>();
        foreach (var (name, t) in original.Model.StateDict())
        {
            var alt = layout.For(name);
            var disk = alt?.Parts.Single().Name ?? name;
            switch (alt?.Interleaved ?? Core.Modules.CheckpointLayout.InterleavedRows.None)
            {
                case Core.Modules.CheckpointLayout.InterleavedRows.EvenThenOdd:
                    var both = t.chunk(2, t.dim() - 2);
                    stored[disk] = Interleave(both[0], both[1]);
                    break;
                case Core.Modules.CheckpointLayout.InterleavedRows.Even: halves[disk] = (t, halves.GetValueOrDefault(disk).Up); break;
                case Core.Modules.CheckpointLayout.InterleavedRows.Odd: halves[disk] = (halves.GetValueOrDefault(disk).Gate, t); break;
                default: stored[disk] = t; break;
            }
        }
        foreach (var (disk, (gate, up)) in halves) stored[disk] = Interleave(gate!, up!);
        // The three sparse layers' routed and shared experts' w13 and the dense layer's w13_dn.
        Assert.Equal(7, stored.Keys.Count(k => k.Contains("w13", StringComparison.Ordinal)));
        Assert.All(stored.Keys, k => Assert.Contains(k, diskNames));

        var dir = Directory.CreateTempSubdirectory("inkling-mm-").FullName;
        try
        {
            File.WriteAllText(Path.Combine(dir, "config.json"), config);
            IO.Safetensors.Save(Path.Combine(dir, "model.safetensors"), stored.Select(kv => new KeyValuePair<string, Tensor>(kv.Key, kv.Value.contiguous())));
            using var loaded = new DisposableModel(TorchModelFactory.Load(dir));
            var loadedState = loaded.Model.StateDict().ToDictionary(x => x.Name, x => x.Value);
            Assert.All(original.Model.StateDict(), x => Assert.True(x.Value.eq(loadedState[x.Name]).all().item<bool>(), $"{x.Name} differs"));
        }
        finally { Directory.Delete(dir, true); }
    }

    /// <summary>
    /// Merging writes inkling_mm_model's own checkpoint back: the routed experts' fused gate_up_proj (one runtime tensor,
    /// gate rows then up rows) and the shared experts' separate gate_proj / up_proj each interleaved again into their
    /// stored w13 tensor, the other tensors under their stored names; the merged checkpoint loads into the adapted
    /// model's outputs (RuntimeChecks.MergesBackIntoTheSavedLayout).
    /// </summary>
    [Fact]
    public void MergesBackIntoTheInterleavedSavedLayout()
    {
        var modelDir = Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe", "inkling_mm_model", "model");
        using var dir = new TempDir();
        using var h = new DisposableModel(TorchModelFactory.Load(modelDir));
        RuntimeChecks.InjectWithNonZeroB(h.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
             "target_parameters": ["mlp.experts.gate_up_proj", "mlp.shared_experts.up_proj"]}
            """);
        var outDir = Path.Combine(dir.Path, "merged");
        RuntimeChecks.MergesBackIntoTheSavedLayout(h.Model, modelDir, outDir);
        var stored = IO.Safetensors.Load(Path.Combine(modelDir, "model.safetensors"));
        var written = IO.Safetensors.Load(Path.Combine(outDir, "model.safetensors"));
        try
        {
            const string layer = "model.llm.layers.1.mlp.";
            // The shared experts' up rows (odd) took ΔW, their gate rows (even) did not.
            var before = stored[layer + "shared_experts.shared_w13_weight"].unflatten(1, [24, 2]);
            var after = written[layer + "shared_experts.shared_w13_weight"].unflatten(1, [24, 2]);
            Assert.True(before.select(2, 0).Same(after.select(2, 0)));
            Assert.False(before.select(2, 1).Same(after.select(2, 1)));
            Assert.False(stored[layer + "experts.w13_weight"].Same(written[layer + "experts.w13_weight"]));
            // Untargeted tensors are written back unchanged.
            Assert.True(stored[layer + "experts.w2_weight"].Same(written[layer + "experts.w2_weight"]));
        }
        finally
        {
            foreach (var t in stored.Values.Concat(written.Values)) t.Dispose();
        }
    }

    /// <summary>The default seed targets (attention projections and the dense MLP's gate/up/down) train.</summary>
    [Fact]
    public void SeedTargetsTrain()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 3));
        var targets = string.Join(", ", Core.Peft.LoraConfig.SeedTargets.Select(t => $"\"{t}\""));
        var (_, grads) = RuntimeChecks.LoraStep(h.Model, $$"""{"r": 2, "lora_alpha": 4, "target_modules": [{{targets}}]}""");
        Assert.Contains(grads.Keys, n => n.Contains("layers.2.self_attn.o_proj.lora_A", StringComparison.Ordinal));
        Assert.Contains(grads.Keys, n => n.Contains("layers.0.mlp.down_proj.lora_B", StringComparison.Ordinal));
        RuntimeChecks.AssertGradients(grads);
    }
}
