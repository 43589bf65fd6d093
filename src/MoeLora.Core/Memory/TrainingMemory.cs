using MoeLora.Core.Analysis;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Core.Memory;

/// <summary>One line of the per-GPU peak: its bytes, the formula that produced them and where the rule comes from.</summary>
public sealed record MemoryTerm(string Name, long Bytes, string Formula, string Source);

/// <summary>A change that was re-estimated because the plan does not fit.</summary>
public sealed record MemoryFix(string Change, long PerGpuBytes, bool Fits);

/// <summary>
/// Peak GPU memory of one training step (what <c>torch.cuda.max_memory_allocated</c> reports), per GPU. The peak is
/// persistent state (weights, adapters, gradients, AdamW states, cuBLAS workspaces) plus the larger of the step's
/// activation peak and the optimizer's temporaries. Every term carries its formula and source.
/// <see cref="TrainingSetup.Runtime"/> picks the fused-expert LoRA whose step is modelled: PEFT's ParamWrapper
/// (<c>fused_expert_lora_weights</c>: W+ΔW kept for backward, and an fp32 ΔW transient) or MoeLora's grouped
/// low-rank path (no ΔW at all; where the runtime recomputes a layer's routed experts in backward, one layer's expert
/// intermediates as <c>expert_recompute</c>, else the r-wide product per routed pair as <c>expert_lora_low_rank</c>).
/// </summary>
public sealed class TrainingMemory
{
    public required TrainingSetup Setup { get; init; }

    public required IReadOnlyList<MemoryTerm> Terms { get; init; }

    /// <summary>Where the peak falls ("backward start", "recompute", "optimizer step").</summary>
    public required string Phase { get; init; }

    /// <summary>Decoder blocks that run (circuit-breaker truncation keeps max(target)+1).</summary>
    public required long LayersRun { get; init; }

    /// <summary>Saved activations of all layers without checkpointing (the property tests compare it).</summary>
    public required long ActivationBytesNoCheckpointing { get; init; }

    /// <summary>Saved activation bytes at the peak (layer activations, or checkpoints plus one recomputed layer).</summary>
    public required long ActivationBytes { get; init; }

    public required IReadOnlyList<MemoryFix> Fixes { get; init; }

    public long PerGpuBytes => Terms.Sum(t => t.Bytes);

    /// <summary>Headroom kept free: max(1 GiB, 5%) for the CUDA context, NCCL buffers and allocator fragmentation,
    /// none of which <c>max_memory_allocated</c> counts.</summary>
    public long ReserveBytes => Math.Max(1L << 30, Setup.GpuMemoryBytes / 20);

    public long UsableBytes => Setup.GpuMemoryBytes - ReserveBytes;

    public bool Fits => PerGpuBytes <= UsableBytes;

    public long this[string term] => Terms.Where(t => t.Name == term).Sum(t => t.Bytes);

    public string Verdict
    {
        get
        {
            var per = Units.Bytes(PerGpuBytes);
            if (Fits) return $"fits: {per} per GPU of {Units.Bytes(Setup.GpuMemoryBytes)} ({Units.Bytes(UsableBytes - PerGpuBytes)} to spare after a {Units.Bytes(ReserveBytes)} reserve)";
            var fixes = Fixes.Where(f => f.Fits).Select(f => $"{f.Change} ({Units.Bytes(f.PerGpuBytes)})").ToList();
            return $"does not fit: {per} per GPU > {Units.Bytes(UsableBytes)} usable of {Units.Bytes(Setup.GpuMemoryBytes)}; " +
                (fixes.Count > 0 ? "fixes: " + string.Join("; ", fixes) : $"no single change tried fits on {Setup.Gpus} × {Units.Bytes(Setup.GpuMemoryBytes)} (gradient checkpointing, nf4, fewer layers, smaller batch or sequence, up to 64 GPUs sharded)");
        }
    }

    static MemoryTerm RecomputeTerm(long bytes) => new("expert_recompute", bytes,
        "one layer's routed-expert intermediates, run again in backward: tokens × (k·a·(3I+H) + per expert target k·a·(in+r))",
        "MoeLora ExpertRecompute (the experts' forward without autograd, recomputed with it in backward)");

    /// <summary>Estimates the per-GPU peak for <paramref name="plan"/> under <paramref name="setup"/>.</summary>
    public static TrainingMemory Estimate(AdapterPlan plan, TrainingSetup setup, bool withFixes = true)
    {
        if (setup.BatchSize <= 0 || setup.SeqLength <= 0) throw new UserInputException("batch size and sequence length must be positive");
        if (setup.Gpus <= 0) throw new UserInputException($"--gpus must be a positive integer, got {setup.Gpus}");
        var spec = plan.Spec;
        long a = setup.DType.Bytes();
        long b = setup.BatchSize, s = setup.SeqLength, tokens = b * s;
        long h = spec.HiddenSize, v = spec.VocabSize, layers = spec.NumHiddenLayers;
        long n = setup.Gpus;
        var cb = setup.Mode == TrainingMode.CircuitBreaker;
        // MoeLora's own runtime (grouped low-rank expert LoRA, its checkpoint node, chunked loss, per-tensor AdamW) or PEFT's.
        var ours = setup.Runtime == LoraRuntime.MoeLora;
        var targets = setup.TargetLayers ?? HiddenStatesMemory.DefaultTargetLayers(layers);
        HiddenStatesMemory.Validate(targets, layers);
        long run = cb && !setup.CbFullLayers && targets.Count > 0 ? Math.Min(layers, targets.Max() + 1L) : layers;
        var zero3 = setup.Sharding is Sharding.Zero3 or Sharding.Fsdp;
        var partitionGrads = setup.Sharding is Sharding.Zero2 or Sharding.Zero3 or Sharding.Fsdp;
        var terms = new List<MemoryTerm>();
        void Add(string name, long bytes, string formula, string source) => terms.Add(new MemoryTerm(name, bytes, formula, source));

        // ---- weights
        var (quantized, qstate, plain) = WeightMemory.Bytes(spec, setup.DType, setup.Quantization, setup.DoubleQuant, run < layers ? run : null);
        var baseBytes = quantized + plain;
        var weightNote = setup.Quantization switch
        {
            Quantization.None => $"parameters × {a} B ({setup.DType.Name()})",
            Quantization.Int8 => "nn.Linear weights × 1 B (int8) + other parameters × dtype",
            _ => "nn.Linear weights × 0.5 B (NF4, two codes per byte) + other parameters (embeddings, norms, routers, fused 3-D experts) × dtype",
        };
        if (run < layers) weightNote += $"; blocks {run}..{layers - 1} are not loaded (truncation)";
        var weightSource = "transformers from_pretrained(torch_dtype); bitsandbytes Linear8bitLt / Linear4bit replace nn.Linear except lm_head";
        if (zero3 && n > 1)
        {
            Add("base_weights", Div(baseBytes, n), weightNote + $", partitioned over {n} GPUs", "ZeRO-3 / FSDP FULL_SHARD keep 1/N of every parameter");
            var largest = WeightMemory.LargestLayerParameters(spec) * (setup.Quantization == Quantization.None ? a : a);
            Add("gathered_layers", 2 * largest, "2 × largest decoder layer's parameters × dtype (the layer being computed and the prefetched one)",
                "DeepSpeed stage3 prefetch / FSDP forward_prefetch; cf. estimate_zero3_model_states_mem_needs (4 × largest layer in fp16 ≈ 2 × in bf16)");
        }
        else if (setup.Sharding == Sharding.Ep && n > 1 && spec.Moe.IsMoe)
        {
            var experts = WeightMemory.RoutedExpertParameters(spec) * a;
            var split = Math.Min(n, spec.Moe.NumExperts);
            Add("base_weights", baseBytes - experts + Div(experts, split), weightNote + $"; routed experts split over {split} GPUs (E/N per GPU), the rest replicated",
                "expert parallelism (DeepSpeed-MoE / Megatron EP): each rank owns num_experts/EP experts of every MoE layer");
        }
        else
        {
            Add("base_weights", baseBytes, weightNote, weightSource);
        }
        if (qstate > 0)
        {
            var f = setup.Quantization == Quantization.Int8
                ? "out_features × 4 B per Linear (SCB, one fp32 scale per row)"
                : setup.DoubleQuant
                    ? "per Linear: ceil(n/64) × 1 B (uint8 absmax) + ceil(n/64/256) × 4 B (fp32 absmax of absmax) + 1 KiB code + 4 B offset + 64 B NF4 code"
                    : "per Linear: ceil(n/64) × 4 B (fp32 absmax) + 64 B NF4 code";
            Add("quant_state", zero3 && n > 1 ? Div(qstate, n) : qstate, f, "bitsandbytes functional.quantize_4bit (blocksize=64, compress_statistics → quantize_blockwise(absmax, blocksize=256)) / Int8Params");
        }

        // ---- trainable state
        var runTargets = plan.Targets.Where(t => t.Layer is null || t.Layer < run).ToList();
        var loraParams = runTargets.Sum(t => t.NumParameters);
        var extras = plan.Extras.Sum(e => e.NumElements);
        var paramBytes = 4 * loraParams + a * extras;
        Add("lora_adapters", zero3 && n > 1 ? Div(4 * loraParams, n) : 4 * loraParams, $"{loraParams:N0} LoRA parameters × 4 B (fp32)",
            "PEFT autocast_adapter_dtype=True upcasts bf16/fp16 adapters to fp32");
        if (extras > 0)
            Add("modules_to_save", zero3 && n > 1 ? Div(a * extras, n) : a * extras, $"{extras:N0} trainable base-dtype parameters (modules_to_save copies, biases) × {a} B",
                "PEFT ModulesToSaveWrapper deep-copies the module in the base dtype");
        Add("gradients", partitionGrads && n > 1 ? Div(paramBytes, n) : paramBytes, "one gradient per trainable parameter, in its dtype" + (partitionGrads && n > 1 ? $", partitioned over {n} GPUs" : ""),
            "autograd .grad; ZeRO-2/3 and FSDP reduce-scatter gradients to their owner");
        Add("optimizer_states", partitionGrads && n > 1 ? Div(2 * paramBytes, n) : 2 * paramBytes, "AdamW exp_avg + exp_avg_sq: 2 × trainable bytes (same dtype as the parameter)" + (partitionGrads && n > 1 ? $", partitioned over {n} GPUs" : ""),
            "torch.optim.AdamW (zeros_like(param) per state); ZeRO-1/2/3 partition optimizer states");
        Add("cuda_workspace", 2 * setup.CublasWorkspaceBytes, $"2 × {Units.Bytes(setup.CublasWorkspaceBytes)} cuBLAS workspaces (forward thread + autograd thread)",
            "PyTorch allocates the cuBLAS/cuBLASLt workspace through the caching allocator, one per handle (32 MiB default on Hopper)");

        // ---- activations
        var acts = LayerActivations.Build(plan, (int)a, setup.Attention, run, setup.Runtime);
        long actTokens = acts.Sum(x => x.NeedsGrad ? x.PerTokenBytes * tokens + x.PerTokenPerKeyBytes * tokens * s : 0);
        long actLowRank = acts.Sum(x => x.NeedsGrad ? x.LowRankPerTokenBytes * tokens : 0);
        long actDeltas = acts.Sum(x => x.NeedsGrad ? x.ConstantBytes : 0);
        // MoeLora's runtime runs each layer's routed experts again in backward (ExpertRecompute): one layer's worth.
        long recompute = acts.Select(x => x.RecomputeBytes(tokens)).DefaultIfEmpty(0).Max();
        long maxLayer = acts.Select(x => x.Bytes((int)b, (int)s) + x.RecomputeBytes(tokens)).DefaultIfEmpty(0).Max();
        long deltaTransient = acts.Select(x => x.TransientBytes).DefaultIfEmpty(0).Max();
        // MoeLora's checkpoint node (a TorchSharp custom autograd function) also holds an uninitialised buffer of its
        // output's shape until backward: two hidden states per layer where torch.utils.checkpoint keeps one.
        long perCheckpoint = ours ? 2 : 1;
        long checkpoints = setup.GradientCheckpointing ? perCheckpoint * run * a * h * tokens : 0;
        var passes = cb ? 2 : 1;
        var eagerLayers = Enumerable.Range(0, (int)run).Count(i => LayerActivations.EffectiveAttention(plan.Spec, i, setup.Attention, setup.Runtime) == AttentionImpl.Eager);
        var sdpaText = ours ? "a·(q+2·heads·head_dim+o) + 4·heads" : "a·(q+k+v+o)";
        const string eagerText = "a·(q+2·heads·head_dim) + heads·S·(4+a)";
        var attnText = eagerLayers == 0 ? sdpaText
            : eagerLayers == run ? eagerText
            : $"{sdpaText} (sdpa layers), {eagerText} ({eagerLayers} eager layers)";
        var expertsText = recompute > 0 ? "2a·H (routed experts: input and output; their intermediates are recomputed)" : "k·a·(3I+H) (routed experts)";
        var loraText = ours ? "a·in per LoRA Linear (its input, kept narrow)" : "4·in per LoRA Linear (fp32 input copy)";
        var actFormula = "Σ layers tokens × (4·norm widths + attention " + attnText +
                         $" + 3a·I (gated MLP) + {expertsText} + {loraText})";
        const string actSource = "transformers 5.17 modeling code + PEFT 0.21 lora.Linear.forward (_cast_input_dtype); autograd saves an input only when another input's gradient needs it";
        long stepTransient;
        string phase;
        var stepTerms = new List<MemoryTerm>();
        // MoeLora runs a frozen head and the cross-entropy chunk by chunk (ChunkedLmLoss); PEFT's step keeps whole fp32 logits.
        var chunkedLoss = ours && ChunkedLmLoss.Applies(plan);
        long loss = cb ? 0 : chunkedLoss ? ChunkedLmLoss.PeakBytes(tokens, v, h, a) : 12 * tokens * v;
        if (!setup.GradientCheckpointing)
        {
            stepTerms.Add(new("activations", passes * actTokens, (cb ? "2 adapted passes × " : "") + actFormula, actSource));
            if (actDeltas > 0)
                stepTerms.Add(new("fused_expert_lora_weights", passes * actDeltas, "Σ fused-expert targets a·E·in·out: the merged weight W + B@A built on every forward and kept for backward",
                    "PEFT ParamWrapper (target_parameters) materialises the per-expert delta weight; PEFT docs: 'merge before serving'"));
            if (actLowRank > 0)
                stepTerms.Add(new("expert_lora_low_rank", passes * actLowRank, (cb ? "2 adapted passes × " : "") + "Σ fused-expert targets tokens × k × a·r: the r-wide x·Rᵀ kept per routed pair (no ΔW is formed)",
                    "MoeLora grouped expert LoRA (ExpertsBase.Mm: bmm(bmm(x, Rᵀ), Lᵀ) saves x and x·Rᵀ)"));
            phase = "backward start";
        }
        else
        {
            stepTerms.Add(ours
                ? new("checkpoints", passes * checkpoints, $"{(cb ? "2 passes × " : "")}{run} layers × tokens × 2·H × a (layer input + the checkpoint node's output buffer)",
                    "MoeLora CheckpointedLayer (one custom autograd node per decoder layer)")
                : new("checkpoints", passes * checkpoints, $"{(cb ? "2 passes × " : "")}{run} layers × tokens × H × a (layer inputs kept by torch.utils.checkpoint)",
                    "transformers gradient_checkpointing_enable (one checkpoint per decoder layer)"));
            stepTerms.Add(new("activations", maxLayer + 2 * a * h * tokens, "the largest layer's saved activations (recomputed) + its input and output gradients (2·a·H per token)", actSource));
            phase = "recompute";
        }
        if (!cb)
        {
            // The loss's buffers coexist with every saved activation (no checkpointing), or with the checkpoints.
            var lossPeak = loss;
            var layerPeak = setup.GradientCheckpointing ? maxLayer + 2 * a * h * tokens + deltaTransient : deltaTransient;
            if (setup.GradientCheckpointing && loss >= layerPeak)
            {
                stepTerms.RemoveAll(t => t.Name == "activations");
                phase = "loss backward";
            }
            stepTerms.Add(chunkedLoss
                ? new("logits_loss", lossPeak, $"8 × min(tokens, {ChunkedLmLoss.ChunkTokens(v):N0}) × vocab (the fp32 logits of one chunk and their log-softmax) + a·tokens·H (the head input's gradient)",
                    "MoeLora LinearCrossEntropy: the frozen LM head and the cross-entropy run per chunk, forward and again in backward; no [tokens, vocab] tensor is kept")
                : new("logits_loss", lossPeak, "12 × tokens × vocab: fp32 log_softmax output (saved) + nll_loss grad + log_softmax grad, 4 B each",
                    "transformers ForCausalLMLoss upcasts logits to fp32 (logits.float()) before F.cross_entropy"));
            if (deltaTransient > 0 && (setup.GradientCheckpointing ? loss < layerPeak : deltaTransient > loss))
            {
                stepTerms.RemoveAll(t => t.Name == "logits_loss");
                stepTerms.Add(new("fused_expert_delta_fp32", deltaTransient, "largest fused-expert target: E·in·out × 4 B (fp32 B@A before the cast)", "PEFT ParamWrapper get_delta_weight in the adapter dtype"));
            }
            // Without checkpointing the loss's buffers are gone before backward reaches a layer's experts.
            if (!setup.GradientCheckpointing && recompute > Math.Max(loss, deltaTransient))
            {
                stepTerms.RemoveAll(t => t.Name == "logits_loss");
                stepTerms.Add(RecomputeTerm(recompute));
            }
        }
        else
        {
            var hsAll = (run + 1) * tokens * h * a;
            var hsTgt = targets.Distinct().Count() * tokens * h * a;
            stepTerms.Add(new("hidden_states", 2 * hsAll + 2 * hsTgt,
                $"frozen retain stack + adapted (masked) retain stack: 2 × {run + 1} states × tokens × H × a; frozen + adapted CB stacks: 2 × {targets.Distinct().Count()} target states",
                "circuit-breakers reference: torch.stack(outputs['hidden_states']) for the retain loss, target layers only for the RR loss"));
            stepTerms.Add(new("cb_losses", hsAll + 12 * hsTgt / a,
                "retain: ‖h_lora − h_orig‖ keeps the difference (a B per element); RR: fp32 normalised states and their product (12 B per target element)",
                "compute_loss in lorra_circuit_breaker.py (torch.norm(..., dtype=torch.float))"));
            var tail = Math.Max(a * tokens * v, deltaTransient);
            if (!setup.GradientCheckpointing && recompute > tail) stepTerms.Add(RecomputeTerm(recompute));
            else
                stepTerms.Add(new("cb_transient", tail, "max(bf16 logits a·tokens·V of the last adapted pass, fused-expert fp32 delta); torch.norm(dtype=float) casts inside the reduction, no fp32 copy",
                    "the CausalLM output (and its logits) lives until ['hidden_states'] is taken; TensorIterator reductions cast on the fly"));
            phase = setup.GradientCheckpointing ? "recompute" : "backward start";
        }
        stepTransient = stepTerms.Sum(t => t.Bytes);
        // torch's foreach AdamW takes the square roots of every moment at once; MoeLora's AdamW one parameter at a time.
        long optTemp = ours ? 4 * plan.TrainableTensors.Select(t => t.NumElements).DefaultIfEmpty(0).Max() : paramBytes;
        if (optTemp > stepTransient)
        {
            terms.Add(ours
                ? new("optimizer_temp", optTemp, "the largest trainable tensor × 4 B: the one square root of AdamW's update alive at a time",
                    "MoeLora AdamW.Step (per-parameter sqrt, freed before the next parameter)")
                : new("optimizer_temp", partitionGrads && n > 1 ? Div(optTemp, n) : optTemp, "one trainable-sized temporary of the foreach AdamW update",
                    "torch.optim.adamw _multi_tensor_adamw (exp_avg_sq.sqrt())"));
            phase = "optimizer step";
        }
        else
        {
            terms.AddRange(stepTerms);
        }

        var result = new TrainingMemory
        {
            Setup = setup,
            Terms = terms,
            Phase = phase,
            LayersRun = run,
            ActivationBytesNoCheckpointing = actTokens + actDeltas + actLowRank,
            ActivationBytes = setup.GradientCheckpointing ? checkpoints + maxLayer : actTokens + actDeltas + actLowRank,
            Fixes = [],
        };
        if (!withFixes || result.Fits) return result;
        return new TrainingMemory
        {
            Setup = result.Setup, Terms = result.Terms, Phase = result.Phase, LayersRun = result.LayersRun,
            ActivationBytesNoCheckpointing = result.ActivationBytesNoCheckpointing, ActivationBytes = result.ActivationBytes,
            Fixes = FindFixes(plan, setup),
        };
    }

    private static long Div(long x, long n) => (x + n - 1) / n;

    /// <summary>Re-estimates single changes (and one pair) to tell the user what makes the plan fit.</summary>
    private static List<MemoryFix> FindFixes(AdapterPlan plan, TrainingSetup setup)
    {
        var fixes = new List<MemoryFix>();
        var current = Estimate(plan, setup, withFixes: false).PerGpuBytes;
        void Try(string change, AdapterPlan p, TrainingSetup s)
        {
            var m = Estimate(p, s, withFixes: false);
            fixes.Add(new MemoryFix(change, m.PerGpuBytes, m.Fits));
        }
        if (!setup.GradientCheckpointing) Try("--gradient-checkpointing", plan, setup with { GradientCheckpointing = true });
        if (setup.Quantization != Quantization.Nf4) Try("--quantization nf4 (4-bit base)", plan, setup with { Quantization = Quantization.Nf4 });
        if (!setup.GradientCheckpointing && setup.Quantization != Quantization.Nf4)
            Try("--gradient-checkpointing --quantization nf4", plan, setup with { GradientCheckpointing = true, Quantization = Quantization.Nf4 });
        if (setup.Mode == TrainingMode.CircuitBreaker && setup.CbFullLayers)
            Try("truncate to max(target)+1 blocks (drop --cb-full-layers)", plan, setup with { CbFullLayers = false });
        if (setup.Mode == TrainingMode.Lora && plan.Spec.NumHiddenLayers >= 4)
        {
            var l = (int)plan.Spec.NumHiddenLayers;
            try
            {
                var upper = Enumerable.Range(l / 2, l - l / 2).ToList();
                var fewer = AdapterPlanner.Plan(plan.Spec, plan.Requested with { LayersToTransform = upper }, plan.Version);
                Try($"train layers {l / 2}..{l - 1} only (layers_to_transform)", fewer, setup);
            }
            catch (Exception e) when (e is PeftConfigException or ArgumentException)
            {
                // Some layouts need layers_pattern; skip the suggestion.
            }
        }
        for (var batch = setup.BatchSize / 2; batch >= 1; batch /= 2)
        {
            var m = Estimate(plan, setup with { BatchSize = batch }, false);
            if (m.Fits || batch == 1) { fixes.Add(new MemoryFix($"--batch-size {batch}", m.PerGpuBytes, m.Fits)); break; }
        }
        for (var seq = setup.SeqLength / 2; seq >= 128; seq /= 2)
        {
            var m = Estimate(plan, setup with { SeqLength = seq }, false);
            if (m.Fits || seq / 2 < 128) { fixes.Add(new MemoryFix($"--seq-length {seq}", m.PerGpuBytes, m.Fits)); break; }
        }
        var sharding = setup.Sharding is Sharding.Zero3 or Sharding.Fsdp or Sharding.Ep ? setup.Sharding : Sharding.Zero3;
        for (var g = Math.Max(2, setup.Gpus * 2); g <= 64; g *= 2)
        {
            var m = Estimate(plan, setup with { Gpus = g, Sharding = sharding }, false);
            if (m.Fits || g * 2 > 64) { fixes.Add(new MemoryFix($"--gpus {g} --sharding {TrainingSetup.Name(sharding)}", m.PerGpuBytes, m.Fits)); break; }
        }
        // A fix is offered only for what it claims: making the step fit. A row that leaves the peak unchanged (e.g.
        // layers_to_transform when only target_parameters are adapted) or still does not fit is no fix; when none
        // is left, the verdict says that no single change tried fits on this hardware.
        return fixes.Where(f => f.Fits && f.PerGpuBytes < current).ToList();
    }
}
