using MoeLora.Core.Analysis;
using MoeLora.Core.Memory;
using MoeLora.Core.Peft;
using CsCheck;

namespace MoeLora.Core.Tests.Memory;

/// <summary>Hand-checked cases for every formula of the memory model, and its monotonicity properties.</summary>
public class MemoryFormulaTests
{
    private static readonly Lazy<AdapterPlan> Llama = new(() => AdapterPlanner.Plan(MeasuredMemoryTests.Spec("meta-llama__Meta-Llama-3.1-8B"), LoraConfig.SeedDefault, null));
    private static readonly Lazy<AdapterPlan> Mixtral = new(() => AdapterPlanner.Plan(MeasuredMemoryTests.Spec("mistralai__Mixtral-8x7B-v0.1"), LoraConfig.SeedDefault, null));

    [Fact]
    public void Nf4_state_follows_the_bitsandbytes_layout()
    {
        // 4096 x 4096 = 16,777,216 elements: 8,388,608 B packed; 262,144 blocks of 64.
        const long n = 4096L * 4096;
        // Double quant: 262,144 B uint8 absmax + 1,024 nested fp32 absmax (4,096 B) + 1 KiB code + 4 B offset + 64 B NF4 code.
        Assert.Equal(8_388_608 + 262_144 + 4_096 + 1_024 + 4 + 64, WeightMemory.Nf4Bytes(n, doubleQuant: true));
        // Plain: fp32 absmax per block.
        Assert.Equal(8_388_608 + 262_144 * 4 + 64, WeightMemory.Nf4Bytes(n, doubleQuant: false));
        // Odd sizes round up: 65 elements = 33 packed bytes, 2 blocks.
        Assert.Equal(33 + 2 * 4 + 64, WeightMemory.Nf4Bytes(65, doubleQuant: false));
    }

    [Fact]
    public void Int8_keeps_one_fp32_scale_per_row() => Assert.Equal(4096 * 14336 + 14336 * 4, WeightMemory.Int8Bytes(14336, 4096));

    [Fact]
    public void Nf4_quantises_linears_but_not_embeddings_head_or_fused_experts()
    {
        var spec = Mixtral.Value.Spec;
        var (q, st, plain) = WeightMemory.Bytes(spec, DType.BFloat16, Quantization.Nf4);
        // Attention linears only (v5 fused experts and the TopK routers are not nn.Linear): 32 x (4096x4096x2 + 4096x1024x2).
        const long attn = 32L * (4096 * 4096 * 2 + 4096 * 1024 * 2);
        Assert.Equal(attn / 2, q);
        Assert.True(st > 0);
        Assert.Equal(spec.Tree.NumParameters * 2 - attn * 2, plain);
    }

    [Fact]
    public void Llama_layer_saves_72_hidden_widths_per_token()
    {
        // 2 RMSNorm fp32 copies 8H + sdpa q,k,v,out 2(H+H/4+H/4+H)=5H + LoRA fp32 inputs 4(3H+H+2H)+4·14336 + 3·2·I + 4r·7.
        var layers = LayerActivations.Build(Llama.Value, 2, AttentionImpl.Sdpa, 32);
        const long h = 4096, i = 14336;
        var expected = 8 * h + 2 * (h + h / 4 + h / 4 + h) + 4 * (6 * h + i) + 6 * i + 4 * 16 * 7;
        Assert.Equal(expected, layers[0].PerTokenBytes);
        Assert.All(layers, l => Assert.Equal(0, l.ConstantBytes));
    }

    [Fact]
    public void Eager_attention_adds_scores_per_key()
    {
        var layer = LayerActivations.Build(Llama.Value, 2, AttentionImpl.Eager, 1)[0];
        Assert.Equal(32 * (4 + 2), layer.PerTokenPerKeyBytes); // fp32 softmax + its bf16 cast, 32 heads
    }

    [Fact]
    public void Mixtral_routed_tokens_keep_gate_up_act_and_output()
    {
        var layer = LayerActivations.Build(Mixtral.Value, 2, AttentionImpl.Sdpa, 1)[0];
        const long h = 4096, i = 14336;
        var expected = 8 * h + 2 * (h + h / 4 + h / 4 + h) + 4 * (3 * h + h) + 4 * 16 * 4 + 2 * 2 * (3 * i + h) + 4 * 8 + 12 * 2;
        Assert.Equal(expected, layer.PerTokenBytes);
    }

    [Fact]
    public void Fused_expert_lora_materialises_E_in_out_per_layer()
    {
        var plan = AdapterPlanner.Plan(Mixtral.Value.Spec, LoraConfig.SeedDefault with
        {
            TargetModules = ModuleSelector.List(["q_proj"]),
            TargetParameters = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        }, null);
        var layer = LayerActivations.Build(plan, 2, AttentionImpl.Sdpa, 1)[0];
        const long e = 8, h = 4096, i = 14336;
        Assert.Equal(2 * (e * h * 2 * i + e * i * h), layer.ConstantBytes); // bf16 merged weights kept for backward
        Assert.Equal(4 * e * h * 2 * i, layer.TransientBytes); // fp32 delta of gate_up
        var m = TrainingMemory.Estimate(plan, new TrainingSetup { SeqLength = 1024 });
        Assert.Equal(32 * layer.ConstantBytes, m["fused_expert_lora_weights"]);
    }

    [Fact]
    public void Loss_buffers_are_twelve_bytes_per_logit()
    {
        var m = TrainingMemory.Estimate(Llama.Value, new TrainingSetup { BatchSize = 2, SeqLength = 1000 });
        Assert.Equal(12L * 2000 * 128256, m["logits_loss"]);
        Assert.Equal(4L * 41_943_040, m["lora_adapters"]);
        Assert.Equal(4L * 41_943_040, m["gradients"]);
        Assert.Equal(8L * 41_943_040, m["optimizer_states"]);
        Assert.Equal(64L << 20, m["cuda_workspace"]);
        Assert.Equal(m.Terms.Sum(t => t.Bytes), m.PerGpuBytes);
    }

    [Fact]
    public void Circuit_breaker_truncates_and_keeps_stacked_states()
    {
        var setup = new TrainingSetup { Mode = TrainingMode.CircuitBreaker, TargetLayers = [10, 20], SeqLength = 1024, BatchSize = 16 };
        var m = TrainingMemory.Estimate(Llama.Value, setup);
        Assert.Equal(21, m.LayersRun);
        // 2 retain stacks of 22 states + 2 CB stacks of 2 states, 16 x 1024 x 4096 x 2 B each (the reference's 2.75 GiB per stack).
        const long state = 16L * 1024 * 4096 * 2;
        Assert.Equal(2 * 22 * state + 2 * 2 * state, m["hidden_states"]);
        Assert.Equal(0, m["logits_loss"]);
        var full = TrainingMemory.Estimate(Llama.Value, setup with { CbFullLayers = true });
        Assert.Equal(32, full.LayersRun);
        Assert.True(full.PerGpuBytes > m.PerGpuBytes);
    }

    [Fact]
    public void Zero3_partitions_and_gathers_two_layers()
    {
        var ddp = TrainingMemory.Estimate(Mixtral.Value, new TrainingSetup());
        var z3 = TrainingMemory.Estimate(Mixtral.Value, new TrainingSetup { Gpus = 8, Sharding = Sharding.Zero3 });
        Assert.Equal((ddp["base_weights"] + 7) / 8, z3["base_weights"]);
        Assert.Equal(2 * 2 * WeightMemory.LargestLayerParameters(Mixtral.Value.Spec), z3["gathered_layers"]);
        var ep = TrainingMemory.Estimate(Mixtral.Value, new TrainingSetup { Gpus = 8, Sharding = Sharding.Ep });
        Assert.True(ep["base_weights"] < ddp["base_weights"] / 4);
    }

    [Fact]
    public void Verdict_names_fixes_that_fit()
    {
        var m = TrainingMemory.Estimate(Mixtral.Value, new TrainingSetup { SeqLength = 4096, GpuMemoryBytes = 80L << 30 });
        Assert.False(m.Fits);
        Assert.Contains(m.Fixes, f => f.Fits && f.Change.StartsWith("--quantization nf4", StringComparison.Ordinal) is false && f.Change.Contains("--gpus", StringComparison.Ordinal));
        Assert.Contains("does not fit", m.Verdict, StringComparison.Ordinal);
        var small = TrainingMemory.Estimate(Llama.Value, new TrainingSetup());
        Assert.True(small.Fits);
        Assert.StartsWith("fits", small.Verdict, StringComparison.Ordinal);
    }

    private static readonly Gen<TrainingSetup> Setups =
        Gen.Select(Gen.Int[1, 8], Gen.Int[1, 4096], Gen.Bool, Gen.Int[0, 2], Gen.Int[0, 1], Gen.Bool, Gen.Int[1, 64])
            .Select(t => new TrainingSetup
            {
                BatchSize = t.Item1, SeqLength = t.Item2, GradientCheckpointing = t.Item3,
                Quantization = (Quantization)t.Item4, Attention = (AttentionImpl)t.Item5,
                Mode = t.Item6 ? TrainingMode.CircuitBreaker : TrainingMode.Lora, Gpus = t.Item7,
            });

    [Fact]
    public void More_gpus_never_raise_per_gpu_bytes_under_zero3() =>
        Gen.Select(Setups, Gen.Int[1, 32], Gen.Bool).Sample(t =>
        {
            var (setup, extra, moe) = t;
            var plan = moe ? Mixtral.Value : Llama.Value;
            var few = TrainingMemory.Estimate(plan, setup with { Sharding = Sharding.Zero3 }, withFixes: false);
            var many = TrainingMemory.Estimate(plan, setup with { Sharding = Sharding.Zero3, Gpus = setup.Gpus + extra }, withFixes: false);
            return many.PerGpuBytes <= few.PerGpuBytes;
        }, iter: 200);

    [Fact]
    public void Gradient_checkpointing_never_raises_activation_bytes() =>
        Gen.Select(Setups, Gen.Bool).Sample(t =>
        {
            var plan = t.Item2 ? Mixtral.Value : Llama.Value;
            var off = TrainingMemory.Estimate(plan, t.Item1 with { GradientCheckpointing = false }, false);
            var on = TrainingMemory.Estimate(plan, t.Item1 with { GradientCheckpointing = true }, false);
            return on.ActivationBytes <= off.ActivationBytes;
        }, iter: 200);

    [Fact]
    public void Target_layer_hidden_states_never_exceed_all_layers() =>
        Gen.Select(Gen.Int[1, 64], Gen.Int[1, 8192], Gen.Int[1, 128], Gen.Int[0, 128].List[0, 6]).Sample(t =>
        {
            var (batch, seq, layers, raw) = t;
            var hs = new HiddenStatesMemory
            {
                BatchSize = batch, SeqLength = seq, DType = DType.BFloat16, HiddenSize = 4096, NumLayers = layers,
                TargetLayers = raw.Select(x => x % (layers + 1)).ToList(),
            };
            return hs.TargetLayersBytes <= hs.AllLayersBytes;
        }, iter: 300);
}
