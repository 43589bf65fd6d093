using MoeLora.Core.Analysis;

namespace MoeLora.Core.Memory;

/// <summary>How the frozen base weights are stored.</summary>
public enum Quantization
{
    /// <summary>Base weights in the training dtype.</summary>
    None,
    /// <summary>bitsandbytes LLM.int8 (<c>Linear8bitLt</c>): int8 weights plus one fp32 scale per output row.</summary>
    Int8,
    /// <summary>bitsandbytes 4-bit NF4 (<c>Linear4bit</c>, QLoRA): packed nibbles plus the blockwise quantisation state.</summary>
    Nf4,
}

/// <summary>How data-parallel ranks share model state.</summary>
public enum Sharding
{
    /// <summary>DistributedDataParallel: every GPU holds everything.</summary>
    Ddp,
    /// <summary>DeepSpeed ZeRO-2: gradients and optimizer states partitioned over the GPUs.</summary>
    Zero2,
    /// <summary>DeepSpeed ZeRO-3: parameters too; one layer is gathered at a time.</summary>
    Zero3,
    /// <summary>PyTorch FSDP (FULL_SHARD): the same per-GPU arithmetic as ZeRO-3.</summary>
    Fsdp,
    /// <summary>Expert parallelism: routed experts split over the GPUs (E/N each), the rest replicated as under DDP.</summary>
    Ep,
}

/// <summary>What one step trains.</summary>
public enum TrainingMode
{
    /// <summary>Supervised LoRA: one forward with labels (cross-entropy), backward, AdamW step.</summary>
    Lora,
    /// <summary>The circuit-breaker (representation rerouting) step as the reference recipe runs it.</summary>
    CircuitBreaker,
}

/// <summary>Which LoRA runtime computes the fused-expert adapters (the only place the two differ in memory).</summary>
public enum LoraRuntime
{
    /// <summary>
    /// PyTorch + PEFT 0.21: <c>ParamWrapper</c> materialises W + ΔW for every adapted fused-expert tensor on every
    /// forward and autograd keeps it for backward (plus an fp32 ΔW transient).
    /// </summary>
    Peft,
    /// <summary>
    /// MoeLora's TorchSharp runtime: grouped low-rank expert LoRA (<c>x·Rᵀ·Lᵀ</c> per expert group), never forming
    /// ΔW; backward keeps the expert input (as PEFT does) and the r-wide intermediate <c>x·Rᵀ</c> per routed pair.
    /// </summary>
    MoeLora,
}

/// <summary>The attention implementation (<c>attn_implementation</c>).</summary>
public enum AttentionImpl
{
    /// <summary><c>sdpa</c> / flash: O(S) memory, saves q, k, v, out and the log-sum-exp.</summary>
    Sdpa,
    /// <summary><c>eager</c>: materialises batch × heads × S × S scores.</summary>
    Eager,
}

/// <summary>Everything the training-memory model needs besides the model and the adapter plan.</summary>
public sealed record TrainingSetup
{
    /// <summary>Micro-batch size per GPU (each pass of a circuit-breaker step uses this batch).</summary>
    public int BatchSize { get; init; } = 1;

    public int SeqLength { get; init; } = 512;

    /// <summary>Compute dtype of weights and activations.</summary>
    public DType DType { get; init; } = DType.BFloat16;

    public Quantization Quantization { get; init; } = Quantization.None;

    /// <summary>bitsandbytes <c>bnb_4bit_use_double_quant</c> (QLoRA's default recipe); used with NF4 only.</summary>
    public bool DoubleQuant { get; init; } = true;

    public bool GradientCheckpointing { get; init; }

    public int Gpus { get; init; } = 1;

    public long GpuMemoryBytes { get; init; } = 80L << 30;

    public Sharding Sharding { get; init; } = Sharding.Ddp;

    public TrainingMode Mode { get; init; } = TrainingMode.Lora;

    public AttentionImpl Attention { get; init; } = AttentionImpl.Sdpa;

    /// <summary>The runtime whose step is modelled: PEFT (what <c>plan</c>'s train.py runs) or MoeLora's own (<c>train</c>).</summary>
    public LoraRuntime Runtime { get; init; } = LoraRuntime.Peft;

    /// <summary>Circuit-breaker targets as hidden_states indices; null means [L/4, L/2].</summary>
    public IReadOnlyList<int>? TargetLayers { get; init; }

    /// <summary>Circuit breaker: keep every block (the reference's <c>--full_layers</c>); false truncates to max(target)+1.</summary>
    public bool CbFullLayers { get; init; }

    /// <summary>cuBLAS workspace per handle (PyTorch's default on Hopper is 32 MiB; forward and autograd threads each own one).</summary>
    public long CublasWorkspaceBytes { get; init; } = 32L << 20;

    public int Tokens => BatchSize * SeqLength;

    public static Quantization ParseQuantization(string s) => s.Trim().ToLowerInvariant() switch
    {
        "none" or "no" => Quantization.None,
        "int8" or "8bit" or "llm.int8" => Quantization.Int8,
        "nf4" or "4bit" or "qlora" => Quantization.Nf4,
        _ => throw new UserInputException($"unknown quantization '{s}': use none, int8 or nf4"),
    };

    public static Sharding ParseSharding(string s) => s.Trim().ToLowerInvariant() switch
    {
        "ddp" => Sharding.Ddp,
        "zero2" or "zero-2" => Sharding.Zero2,
        "zero3" or "zero-3" => Sharding.Zero3,
        "fsdp" => Sharding.Fsdp,
        "ep" or "expert-parallel" => Sharding.Ep,
        _ => throw new UserInputException($"unknown sharding '{s}': use ddp, zero2, zero3, fsdp or ep"),
    };

    public static TrainingMode ParseMode(string s) => s.Trim().ToLowerInvariant() switch
    {
        "lora" or "sft" => TrainingMode.Lora,
        "circuit-breaker" or "cb" or "rr" => TrainingMode.CircuitBreaker,
        _ => throw new UserInputException($"unknown mode '{s}': use lora or circuit-breaker"),
    };

    public static AttentionImpl ParseAttention(string s) => s.Trim().ToLowerInvariant() switch
    {
        "sdpa" or "flash" or "flash_attention_2" or "flash-attention" => AttentionImpl.Sdpa,
        "eager" => AttentionImpl.Eager,
        _ => throw new UserInputException($"unknown attention implementation '{s}': use eager or sdpa"),
    };

    /// <summary>Parses sizes such as <c>80GiB</c>, <c>141GB</c>, <c>80</c> (GiB).</summary>
    public static long ParseBytes(string s)
    {
        var t = s.Trim();
        var i = 0;
        while (i < t.Length && (char.IsDigit(t[i]) || t[i] == '.')) i++;
        if (i == 0 || !double.TryParse(t[..i], System.Globalization.NumberStyles.Float, System.Globalization.CultureInfo.InvariantCulture, out var v) || v <= 0)
            throw new UserInputException($"--gpu-memory '{s}' is not a size such as 80GiB or 141GB");
        var unit = t[i..].Trim().ToLowerInvariant();
        double mult = unit switch
        {
            "" or "g" or "gib" => 1L << 30,
            "gb" => 1e9,
            "m" or "mib" => 1L << 20,
            "mb" => 1e6,
            "t" or "tib" => 1L << 40,
            "tb" => 1e12,
            _ => throw new UserInputException($"--gpu-memory '{s}': unknown unit '{unit}' (use GiB, GB, MiB, MB, TiB, TB)"),
        };
        return (long)(v * mult);
    }

    public static string Name(Sharding s) => s switch
    {
        Sharding.Ddp => "ddp",
        Sharding.Zero2 => "zero2",
        Sharding.Zero3 => "zero3",
        Sharding.Fsdp => "fsdp",
        _ => "ep",
    };

    public static string Name(TrainingMode m) => m == TrainingMode.Lora ? "lora" : "circuit-breaker";

    public static string Name(Quantization q) => q switch { Quantization.None => "none", Quantization.Int8 => "int8", _ => "nf4" };

    public static string Name(LoraRuntime r) => r == LoraRuntime.Peft ? "peft" : "moelora";

    public static string Name(AttentionImpl a) => a == AttentionImpl.Sdpa ? "sdpa" : "eager";
}
