using MoeLora.Torch.Models;

namespace MoeLora.Torch.Training;

/// <summary>
/// A simple upper-bound memory plan for one circuit-breaker step (issue 3's planner may replace it): base weights of
/// the truncated model in the run dtype; LoRA weights, gradients and AdamW moments in fp32 (16 B per parameter);
/// hidden-state stacks for the retain loss ((L+1)·B·S·H for the frozen pass, the adapted pass and the stack copy);
/// and autograd activations of the adapted passes, about (12·H + 3·k·I) values per token per block (no checkpointing).
/// </summary>
public sealed record MemoryEstimate(long WeightBytes, long AdapterBytes, long HiddenStackBytes, long ActivationBytes)
{
    public long Total => WeightBytes + AdapterBytes + HiddenStackBytes + ActivationBytes;

    public static MemoryEstimate For(string configJson, long baseParams, long adapterParams, int numLayers, int batch,
        int cbSeq, int retainSeq, int dtypeBytes)
    {
        var c = ModelConfig.Parse(configJson);
        long h = c.HiddenSize;
        long inter = c.LongOr("moe_intermediate_size", c.LongOr("intermediate_size", 4 * h));
        long k = c.LongOr("num_experts_per_tok", 1) + (c.Has("shared_expert_intermediate_size") || c.Has("n_shared_experts") ? 1 : 0);
        long seq = Math.Max(cbSeq, retainSeq);
        long tokens = (long)batch * seq;
        long stacks = 3L * (numLayers + 1) * batch * retainSeq * h * dtypeBytes;
        long acts = 2L * numLayers * tokens * (12 * h + 3 * k * inter) * dtypeBytes; // CB + retain adapted passes
        return new MemoryEstimate(baseParams * dtypeBytes, adapterParams * 16, stacks, acts);
    }

    public static string Gib(long bytes) => $"{bytes / (1024.0 * 1024 * 1024):F2} GiB";
}
