using MoeLora.Core.Analysis;
using MoeLora.Core.Architectures;
using MoeLora.Core.Memory;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Cli.Commands;

/// <summary>
/// One circuit-breaker step as <c>moelora train</c> will run it, sized by Core's training-memory model (the one checked
/// against measured H200 steps) from the config and the planned adapters alone, so a run that cannot fit is refused
/// before any weight is loaded. It models MoeLora's own runtime, which train runs: grouped low-rank expert LoRA (no
/// W+ΔW) and SDPA attention (no S × S scores kept) except where the runtime runs eagerly.
/// </summary>
internal static class TrainMemoryPlan
{
    /// <summary>The attention MoeLora's runtime will run (SDPA unless MOELORA_ATTN_IMPLEMENTATION=eager), as Core's setting.</summary>
    public static AttentionImpl RuntimeAttention() =>
        MoeLora.Torch.Nn.AttentionImplementations.Default() == MoeLora.Torch.Nn.AttentionImplementation.Eager ? AttentionImpl.Eager : AttentionImpl.Sdpa;

    public static TrainingMemory Estimate(string configJson, string loraJson, int batch, int seqLength,
        IReadOnlyList<int> targets, bool bf16, bool fullLayers, double availableGb, bool gradientCheckpointing = false) =>
        EstimateWithPlan(configJson, loraJson, batch, seqLength, targets, bf16, fullLayers, availableGb, gradientCheckpointing).Memory;

    public static (TrainingMemory Memory, AdapterPlan Plan) EstimateWithPlan(string configJson, string loraJson, int batch,
        int seqLength, IReadOnlyList<int> targets, bool bf16, bool fullLayers, double availableGb, bool gradientCheckpointing = false)
    {
        var spec = ArchitectureRegistry.Build(Core.Config.ModelConfig.Parse(configJson, "config.json"), Layout.V5);
        var plan = AdapterPlanner.Plan(spec, LoraConfig.FromJson(loraJson, "the run's LoRA config"));
        return (TrainingMemory.Estimate(plan, new TrainingSetup
        {
            Mode = TrainingMode.CircuitBreaker,
            BatchSize = batch,
            SeqLength = seqLength,
            DType = bf16 ? DType.BFloat16 : DType.Float32,
            TargetLayers = targets,
            CbFullLayers = fullLayers,
            GradientCheckpointing = gradientCheckpointing,
            Gpus = 1,
            Runtime = LoraRuntime.MoeLora,
            Attention = TrainMemoryPlan.RuntimeAttention(),
            GpuMemoryBytes = (long)(availableGb * (1L << 30)),
        }), plan);
    }

    /// <summary>The row the train command prints: per-step peak, its largest terms, and the verdict.</summary>
    public static string Describe(TrainingMemory m)
    {
        var top = m.Terms.OrderByDescending(t => t.Bytes).Take(3).Select(t => $"{t.Name} {Units.Bytes(t.Bytes)}");
        return $"{Units.Bytes(m.PerGpuBytes)} per step at {m.Phase} ({string.Join(", ", top)}); {m.Verdict}";
    }
}
