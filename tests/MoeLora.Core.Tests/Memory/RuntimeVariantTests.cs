using MoeLora.Core.Analysis;
using MoeLora.Core.Memory;
using MoeLora.Core.Peft;
using CsCheck;

namespace MoeLora.Core.Tests.Memory;

/// <summary>
/// The MoeLora-runtime variant of the step estimate (grouped low-rank expert LoRA) against the PEFT variant
/// (ParamWrapper's materialised W+ΔW), on Qwen3-30B-A3B with the seed targets, which PEFT rewrites onto the fused
/// experts' gate_up_proj (rank doubled) and down_proj.
/// </summary>
public class RuntimeVariantTests
{
    private static readonly Lazy<AdapterPlan> Qwen = new(() => AdapterPlanner.Plan(MeasuredMemoryTests.Spec("Qwen__Qwen3-30B-A3B"), LoraConfig.SeedDefault, null));

    private static TrainingMemory Estimate(LoraRuntime runtime, TrainingSetup setup) =>
        TrainingMemory.Estimate(Qwen.Value, setup with { Runtime = runtime }, withFixes: false);

    private static readonly Gen<TrainingSetup> Setups =
        Gen.Select(Gen.Int[1, 4], Gen.Int[1, 4096], Gen.Bool, Gen.Int[0, 1], Gen.Bool)
            .Select(t => new TrainingSetup
            {
                BatchSize = t.Item1, SeqLength = t.Item2, GradientCheckpointing = t.Item3, Attention = (AttentionImpl)t.Item4,
                Mode = t.Item5 ? TrainingMode.CircuitBreaker : TrainingMode.Lora,
            });

    [Fact]
    public void The_plan_adapts_fused_experts() =>
        Assert.Contains(Qwen.Value.Targets, t => t.Kind == AdapterKind.Parameter && t.NumExperts > 1);

    [Fact]
    public void MoeLora_has_no_materialised_delta_weight_in_any_setup() =>
        Setups.Sample(setup =>
        {
            var ours = Estimate(LoraRuntime.MoeLora, setup);
            var layers = LayerActivations.Build(Qwen.Value, setup.DType.Bytes(), setup.Attention, ours.LayersRun, LoraRuntime.MoeLora);
            return layers.All(l => l.ConstantBytes == 0 && l.TransientBytes == 0)
                && ours.Terms.All(t => t.Name is not ("fused_expert_lora_weights" or "fused_expert_delta_fp32"));
        }, iter: 100);

    [Fact]
    public void Peft_keeps_the_merged_expert_weights_for_backward()
    {
        var peft = Estimate(LoraRuntime.Peft, new TrainingSetup { SeqLength = 1024 });
        // 48 layers × 128 experts × (gate_up 1536×2048 + down 2048×768) × 2 B (bf16).
        Assert.Equal(48L * 128 * (1536 * 2048 + 2048 * 768) * 2, peft["fused_expert_lora_weights"]);
        Assert.Equal(0, peft["expert_lora_low_rank"]);
    }

    // Per token and MoE layer, the seed targets on Qwen3-30B-A3B (H 2048, I 768, top-8, bf16): the experts' gate_up
    // output, activation and weighted output, a·(3I+H), and each expert target's input and r-wide product, a·(in+r)
    // (gate_up_proj: 2048 + 32, down_proj: 768 + 16), per routed pair.
    private const long RecomputedPerToken = 8L * 2 * (3 * 768 + 2048) + 8L * 2 * (2048 + 32 + 768 + 16);

    [Fact]
    public void MoeLoras_experts_keep_their_input_and_output_and_recompute_the_rest()
    {
        var ours = LayerActivations.Build(Qwen.Value, 2, AttentionImpl.Sdpa, 48, LoraRuntime.MoeLora);
        var peft = LayerActivations.Build(Qwen.Value, 2, AttentionImpl.Sdpa, 48, LoraRuntime.Peft);
        Assert.All(ours, l => Assert.Equal(RecomputedPerToken, l.RecomputePerTokenBytes));
        Assert.All(ours, l => Assert.Equal(0, l.LowRankPerTokenBytes));
        Assert.All(peft, l => Assert.Equal(0, l.RecomputePerTokenBytes));
        // With 4,000 tokens one layer's recomputed experts outgrow the chunked loss: they are the step's transient.
        var step = Estimate(LoraRuntime.MoeLora, new TrainingSetup { BatchSize = 2, SeqLength = 2000 });
        Assert.Equal(4000L * RecomputedPerToken, step["expert_recompute"]);
        Assert.Equal(0, step["logits_loss"]);
    }

    [Fact]
    public void Both_variants_are_monotone_in_tokens() =>
        Gen.Select(Setups, Gen.Int[1, 2048], Gen.Bool).Sample(t =>
        {
            var (setup, more, ours) = t;
            var runtime = ours ? LoraRuntime.MoeLora : LoraRuntime.Peft;
            var shorter = Estimate(runtime, setup);
            var longer = Estimate(runtime, setup with { SeqLength = setup.SeqLength + more });
            return longer.PerGpuBytes >= shorter.PerGpuBytes && longer.ActivationBytes >= shorter.ActivationBytes;
        }, iter: 200);

    [Fact]
    public void MoeLora_equals_peft_without_the_materialised_term_when_nothing_else_differs() =>
        // Long enough sequences that the loss buffers (not PEFT's fp32 ΔW transient) are the step's transient, and
        // no checkpointing (the largest recomputed layer would differ by the merged weight itself). Besides the expert
        // LoRA, MoeLora's SDPA call repeats k/v to all 32 heads (4 kv heads, head_dim 128; TorchSharp has no
        // enable_gqa) and keeps the fp32 log-sum-exp: 2 B × 2 × (32 − 4) × 128 + 4 B × 32 per token and layer; and its
        // lora_A keeps the bf16 input of q/k/v (2048 wide) and o (4096) where PEFT keeps an fp32 copy: 2 B less each,
        // and 4 B × r (16) more for the output buffer of its TorchSharp autograd node. Its LoRA step's loss runs chunk by
        // chunk (ChunkedLmLoss) where transformers keeps 12 B per logit. Its routed experts keep their input and output
        // (2 × 2 B × 2048) and their grouping (3 × 8 B per routed pair) where PEFT's keep k·a·(3I+H) and each expert
        // target's input; the rest is recomputed, one layer
        // at a time, which at these lengths outgrows the loss's chunk.
        Gen.Select(Gen.Int[1, 4], Gen.Int[8192, 16384], Gen.Bool).Sample(t =>
        {
            var setup = new TrainingSetup { BatchSize = t.Item1, SeqLength = t.Item2, Mode = t.Item3 ? TrainingMode.CircuitBreaker : TrainingMode.Lora };
            var peft = Estimate(LoraRuntime.Peft, setup);
            var ours = Estimate(LoraRuntime.MoeLora, setup);
            var materialised = peft["fused_expert_lora_weights"];
            var passes = setup.Mode == TrainingMode.CircuitBreaker ? 2L : 1L;
            var trained = LayerActivations.Build(Qwen.Value, 2, AttentionImpl.Sdpa, ours.LayersRun, LoraRuntime.MoeLora).Count(l => l.NeedsGrad);
            var tokens = passes * trained * (long)setup.BatchSize * setup.SeqLength;
            var repeatedKv = tokens * (2L * 2 * (32 - 4) * 128 + 4 * 32);
            var narrowInputs = tokens * (2L * (3 * 2048 + 4096) - 4 * 4 * 16);
            var keptExperts = tokens * (8L * 2 * (3 * 768 + 2048) + 8L * 2 * (2048 + 768) - 2L * 2 * 2048 - 3L * 8 * 8);
            var tokensInStep = (long)setup.BatchSize * setup.SeqLength;
            var lora = setup.Mode == TrainingMode.Lora;
            var recompute = lora ? tokensInStep * RecomputedPerToken : 0;
            return materialised > 0 && peft["fused_expert_delta_fp32"] == 0 && ours["expert_recompute"] == recompute
                && ours["logits_loss"] == 0 && peft["logits_loss"] == (lora ? 12 * tokensInStep * 151_936 : 0)
                && ours.PerGpuBytes - recompute - repeatedKv + narrowInputs + keptExperts == peft.PerGpuBytes - materialised - peft["logits_loss"]
                && ours.PerGpuBytes < peft.PerGpuBytes;
        }, iter: 60);

    [Fact]
    public void AdamWs_temporary_is_every_moment_in_torch_and_one_tensor_in_MoeLora()
    {
        // Short sequences with checkpointing: the optimizer update is the step's peak in both runtimes.
        var setup = new TrainingSetup { SeqLength = 8, GradientCheckpointing = true };
        var peft = Estimate(LoraRuntime.Peft, setup);
        var ours = Estimate(LoraRuntime.MoeLora, setup);
        Assert.Equal(4 * Qwen.Value.TrainableParameters, peft["optimizer_temp"]);
        // The largest trainable tensor: a gate_up_proj lora_A, (r 32 · 128 experts) × hidden 2048.
        Assert.Equal(4L * 32 * 128 * 2048, ours["optimizer_temp"]);
        Assert.Equal("optimizer step", ours.Phase);
    }

    [Fact]
    public void Checkpointing_keeps_two_hidden_states_per_layer_in_MoeLoras_runtime()
    {
        // MoeLora's CheckpointedLayer keeps the layer input and TorchSharp's output buffer; torch.utils.checkpoint the input.
        long Checkpoints(LoraRuntime runtime)
        {
            var m = Estimate(runtime, new TrainingSetup { SeqLength = 1024, GradientCheckpointing = true });
            var largestLayer = LayerActivations.Build(Qwen.Value, 2, AttentionImpl.Sdpa, 48, runtime).Max(l => l.Bytes(1, 1024) + l.RecomputeBytes(1024));
            return m.ActivationBytes - largestLayer;
        }
        Assert.Equal(48L * 1024 * 2048 * 2, Checkpoints(LoraRuntime.Peft));
        Assert.Equal(2 * 48L * 1024 * 2048 * 2, Checkpoints(LoraRuntime.MoeLora));
    }

    [Fact]
    public void MoeLora_sdpa_keeps_no_scores_and_eager_keeps_heads_times_S_per_token()
    {
        var setup = new TrainingSetup { SeqLength = 1024 };
        var sdpa = LayerActivations.Build(Qwen.Value, 2, AttentionImpl.Sdpa, 48, LoraRuntime.MoeLora);
        var eager = LayerActivations.Build(Qwen.Value, 2, AttentionImpl.Eager, 48, LoraRuntime.MoeLora);
        Assert.All(sdpa, l => Assert.Equal(0, l.PerTokenPerKeyBytes));
        Assert.All(eager, l => Assert.Equal(32 * (4 + 2), l.PerTokenPerKeyBytes)); // fp32 softmax + its bf16 cast, 32 heads
        // At 1024 tokens the scores alone are 48 layers × 1024² × 32 heads × 6 B = 9 GiB; SDPA's estimate is that much lower
        // less the per-token difference (repeated q-wide k/v in both, the eager path keeps no log-sum-exp).
        var s = Estimate(LoraRuntime.MoeLora, setup with { Attention = AttentionImpl.Sdpa });
        var e = Estimate(LoraRuntime.MoeLora, setup with { Attention = AttentionImpl.Eager });
        var scores = 48L * 1024 * 1024 * 32 * 6;
        var perToken = 48L * 1024 * (sdpa[0].PerTokenBytes - eager[0].PerTokenBytes);
        Assert.Equal(scores - perToken, e["activations"] - s["activations"]);
    }

    // DeepSeek-V4's attention has sinks: transformers declares _supports_sdpa = False and MoeLora's runtime runs it eagerly,
    // so a requested sdpa is priced as eager under both runtimes (a Llama layer stays sdpa).
    [Theory]
    [InlineData(LoraRuntime.Peft)]
    [InlineData(LoraRuntime.MoeLora)]
    public void DeepseekV4_attention_is_priced_eager_whatever_is_requested(LoraRuntime runtime)
    {
        var v4 = MoeLora.Core.Architectures.ArchitectureRegistry.Build(MoeLora.Core.Config.ModelConfig.Parse("""
            {"model_type": "deepseek_v4", "vocab_size": 64, "hidden_size": 16, "moe_intermediate_size": 8, "num_hidden_layers": 2,
             "num_attention_heads": 2, "head_dim": 8, "q_lora_rank": 8, "n_routed_experts": 4, "num_experts_per_tok": 2,
             "o_groups": 2, "o_lora_rank": 4, "index_n_heads": 2, "index_head_dim": 8, "partial_rotary_factor": 0.5}
            """, "v4"), MoeLora.Core.Modules.Layout.V5);
        Assert.NotNull(v4.Runtime);
        Assert.All(Enumerable.Range(0, 2), i => Assert.Equal(AttentionImpl.Eager, LayerActivations.EffectiveAttention(v4, i, AttentionImpl.Sdpa, runtime)));
        Assert.Equal(AttentionImpl.Sdpa, LayerActivations.EffectiveAttention(Qwen.Value.Spec, 0, AttentionImpl.Sdpa, runtime));
    }

    [Fact]
    public void MoeLoras_lora_step_prices_one_chunk_of_logits_unless_the_head_trains()
    {
        var setup = new TrainingSetup { SeqLength = 1024 };
        var ours = Estimate(LoraRuntime.MoeLora, setup);
        // 110 tokens of 151,936 words, two fp32 tensors at once, and the bf16 gradient of the head's 1024 × 2048 input.
        Assert.Equal(8L * 110 * 151_936 + 2L * 1024 * 2048, ours["logits_loss"]);
        Assert.Equal(12L * 1024 * 151_936, Estimate(LoraRuntime.Peft, setup)["logits_loss"]);

        // An adapted head (or a trained copy of it) needs the whole logits' gradient: transformers' path, priced as PEFT's.
        var spec = MeasuredMemoryTests.Spec("Qwen__Qwen3-30B-A3B");
        foreach (var config in new[]
                 {
                     LoraConfig.SeedDefault with { TargetModules = ModuleSelector.List(["q_proj", "lm_head"]) },
                     LoraConfig.SeedDefault with { ModulesToSave = ["lm_head"] },
                 })
        {
            var plan = AdapterPlanner.Plan(spec, config, null);
            Assert.False(ChunkedLmLoss.Applies(plan));
            var m = TrainingMemory.Estimate(plan, setup with { Runtime = LoraRuntime.MoeLora }, withFixes: false);
            Assert.Equal(12L * 1024 * 151_936, m["logits_loss"]);
        }
        Assert.True(ChunkedLmLoss.Applies(Qwen.Value));
    }
}
