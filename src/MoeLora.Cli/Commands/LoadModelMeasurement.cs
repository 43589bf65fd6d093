using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Rendering.Document;
using MoeLora.Core.Analysis;
using MoeLora.Core.Peft;
using MoeLora.Sources;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;
using MoeLora.Core;

namespace MoeLora.Cli.Commands;

/// <summary>
/// <c>moelora report MODEL --load-model</c>: predicts memory from Core's ModelSpec and refuses before allocating when
/// the model cannot fit, then builds the model (checkpoint or <c>--init random</c>), injects Core's AdapterPlan, and
/// measures what the config-only report predicts: adapter instances, storage sharing, trainable parameters,
/// hidden-state memory, process peak and per-expert gradient flow against router selection. With
/// <c>--measure-steps</c> it also runs whole LoRA and circuit-breaker training steps (see <see cref="StepMeasurement"/>).
/// </summary>
internal static class LoadModelMeasurement
{
    /// <summary>Tests may pretend the device has this many bytes available.</summary>
    internal static long? AvailableBytesOverride { get; set; }

    public static int Run(LoraReport report, ResolvedModel resolved, ReportCommand.Settings s, Options.OutputFormat format)
    {
        if (s.Init is not null && !s.Init.Equals("random", StringComparison.OrdinalIgnoreCase))
            throw new UserInputException($"--init '{s.Init}': only 'random' is supported (omit --init to load the checkpoint)");
        bool random = s.Init is not null;
        var device = s.Device.Text;
        var plan = report.Plan;
        if (report.Spec.Layout != Core.Modules.Layout.V5)
            throw new UserInputException("--load-model runs the transformers-5 runtime (fused experts); use --layout v5");
        report.Spec.RequireRuntime(); // a model the runtime cannot build is refused before any size check or read
        var dtype = report.Options.DType switch
        {
            DType.Float32 => ScalarType.Float32,
            DType.BFloat16 => ScalarType.BFloat16,
            _ => ScalarType.Float16,
        };

        // 1. Predict and refuse before anything is allocated or read.
        string? dir = null;
        long checkpointBytes = 0;
        var prediction = MemoryPrediction.Of(report, random ? null : 0L, GradTokens(s));
        // A GPU is asked for its own free memory, which needs the runtime (and its CUDA libtorch) up first; still
        // nothing of the model is allocated or read before the check.
        Device? dev = device == "cpu" || AvailableBytesOverride is not null ? null : RuntimeDevice.Select(device);
        var (available, capacityNote) = Capacity(device, dev);
        if (prediction.RequiredBytes > available)
            throw new UserInputException(
                $"{report.Options.ModelId} cannot be loaded on {device}: it needs about {Units.Bytes(prediction.RequiredBytes)} " +
                $"({prediction.RequiredSummary}) but {capacityNote} is {Units.Bytes(available)}; nothing was loaded");
        if (!random)
        {
            dir = resolved.Directory ?? throw new FileNotFoundException(
                $"no checkpoint for {report.Options.ModelId}: its config came from the {resolved.OriginName} (no weights); " +
                "pass a local folder or a model in the Hugging Face cache, or use --init random");
            checkpointBytes = CheckpointLoader.Precheck(dir, report.Spec);
            prediction = MemoryPrediction.Of(report, checkpointBytes, GradTokens(s));
            if (prediction.RequiredBytes > available)
                throw new UserInputException(
                    $"{report.Options.ModelId} cannot be loaded on {device}: loading needs about {Units.Bytes(prediction.RequiredBytes)} " +
                    $"({prediction.RequiredSummary}) but {capacityNote} is {Units.Bytes(available)}; nothing was loaded");
        }
        dev ??= RuntimeDevice.Select(device);

        // 2. Build, inject, measure.
        var measured = Measure(report, resolved, dir, random, dtype, dev, s.Seed, GradTokens(s), s);
        measured.Prediction = prediction;
        measured.CheckpointBytes = checkpointBytes;

        var measuredJson = measured.ToJson(report);
        ReportCommand.Write(ReportDocumentBuilder.Build(report, extra: measured.Sections(report)), report, format, s.Output,
            json => json["measured"] = measuredJson);
        return ExitCodes.Ok;
    }

    static int GradTokens(ReportCommand.Settings s) =>
        s.GradTokens > 0 ? s.GradTokens : throw new UserInputException($"--grad-tokens must be a positive integer, got {s.GradTokens}");

    /// <summary>Bytes available on the device: MemAvailable on the CPU; on CUDA the GPU's free memory (cudaMemGetInfo, else nvidia-smi).</summary>
    static (long Bytes, string What) Capacity(string device, Device? dev)
    {
        if (AvailableBytesOverride is { } o) return (o, $"the {device} memory available");
        var free = dev is null ? DeviceMemory.Host() : DeviceMemory.Free(dev);
        return (free.Bytes, free.Source);
    }

    static Measured Measure(LoraReport report, ResolvedModel resolved, string? dir, bool random, ScalarType dtype, Device dev, long seed, int gradTokens,
        ReportCommand.Settings s)
    {
        TorchRuntime.EnsureInitialized();
        var m = new Measured { RuntimeBaselineBytes = DeviceMemory.ResidentBytes(), IsCuda = dev.type == DeviceType.CUDA };
        var plan = report.Plan;
        var modes = DevicePeakMeter.Order(s.ParsedMeasureSteps);
        // The baseline is read before any model exists; cb runs first on its own truncated model (see Order).
        // On a GPU the meter always runs: the device memory after the build is compared with the prediction.
        var meter = modes.Count > 0 || dev.type == DeviceType.CUDA ? DevicePeakMeter.Start(dev) : null;
        if (modes.Contains("cb"))
            m.Steps.Add(StepMeasurement.CircuitBreaker(report, resolved, dir, random, dtype, dev, seed, s, meter!));
        // Random weights are drawn on the device itself: a real-size model never passes through host memory.
        using var model = random
            ? TorchModelFactory.Random(resolved.ConfigJson, seed, dtype, dev, RandomInit.OnDevice)
            : RuntimeDevice.Load($"loading {report.Options.ModelId}", p => TorchModelFactory.Load(resolved.ConfigJson, dir!, dtype, dev, p));
        model.Eval();
        MemTrace.Mark("model built", dev);
        var adapter = LoraInjector.Inject(model, plan, seed: seed);
        MemTrace.Mark("adapters injected", dev);
        m.AdapterInstances = adapter.Wrappers.Count;
        m.PerExpertSliceAdapters = adapter.Wrappers.Count(w => w.Wrapper is ParamLora p && p.NumExperts > 1);
        m.ExpertSlices = adapter.Wrappers.Where(w => w.Wrapper is ParamLora p && p.NumExperts > 1).Sum(w => ((ParamLora)w.Wrapper).NumExperts);
        var trainable = LoraInjector.PeftNamedParameters(model).ToList();
        m.LoraTensors = trainable.Count;
        // Read once, right after the build and LoRA injection: the report's device row and the LoRA step's "after build"
        // figure (the forward and gradient-flow measurements below would otherwise count in the latter).
        long? afterBuild = meter?.UsedAboveBaseline();
        if (m.IsCuda) m.DeviceAfterBuildBytes = afterBuild;
        m.Counts = Measurements.CountParameters(model);
        m.Shared = Measurements.FindSharedStorage(Measurements.AdapterTensors(model));
        m.DistinctAdapterStorages = trainable.Select(t => Measurements.DataPointer(t.Param)).Distinct().Count();

        // Forward with all hidden states (no grad), then keep only the target layers.
        var hs = report.HiddenStates;
        var gen = new Generator((ulong)seed + 1);
        using (var ids = randint(0, report.Spec.VocabSize, [hs.BatchSize, hs.SeqLength], generator: gen, dtype: ScalarType.Int64))
        using (var mask = ones_like(ids))
        using (no_grad())
        {
            long before = DeviceMemory.ResidentBytes();
            using var output = model.Forward(ids, mask, outputHiddenStates: true);
            m.HiddenStates = output.HiddenStates.Count;
            m.AllStatesBytes = Measurements.RetainedBytes(output.HiddenStates);
            m.TargetStatesBytes = Measurements.RetainedBytes(hs.TargetLayers.Distinct().Select(i => output.HiddenStates[i]));
            m.ForwardRssGrowthBytes = Math.Max(0, DeviceMemory.ResidentBytes() - before);
            m.HiddenStateDType = output.HiddenStates[0].dtype.ToString();
            MemTrace.Mark("hidden-state forward", dev);
        }

        // One backward on a short sequence: which experts' adapter slices get gradient vs which the router picked.
        using (var ids = randint(0, report.Spec.VocabSize, [1, gradTokens], generator: gen, dtype: ScalarType.Int64))
        using (var mask = ones_like(ids))
            m.Flow = GradientFlow.Measure(model, ids, mask);
        MemTrace.Mark("gradient-flow backward", dev);

        // The LoRA step comes last: a real-size step that does not fit ends in a recorded out-of-memory result, and
        // every figure above is already measured (its window still starts after their small forward and backward).
        if (modes.Contains("lora"))
        {
            var lora = StepMeasurement.Lora(report, model, seed, s, meter!, afterBuild!.Value);
            if (m.IsCuda && m.Steps.FirstOrDefault(x => x.Mode == "cb") is { } cb)
                lora.Note = $"its 'after build' reading includes blocks the allocator kept from the circuit-breaker step (which reserved {Units.Bytes(cb.PeakBytes)})" +
                    (lora.PeakBytes <= cb.PeakBytes ? "; its peak is no higher than that reservation, so it is bounded below by it and this step's own peak may be lower" : "");
            m.Steps.Add(lora);
        }

        m.PeakBytes = Measurements.ProcessPeakBytes();
        return m;
    }

    /// <summary>Everything measured on the loaded model.</summary>
    internal sealed class Measured
    {
        public long RuntimeBaselineBytes;
        public int AdapterInstances, LoraTensors, PerExpertSliceAdapters, DistinctAdapterStorages, HiddenStates;
        public long ExpertSlices, AllStatesBytes, TargetStatesBytes, ForwardRssGrowthBytes, PeakBytes, CheckpointBytes;
        /// <summary>CUDA: device memory in use after the build and LoRA injection, above the pre-build baseline.</summary>
        public long? DeviceAfterBuildBytes;
        public string HiddenStateDType = "";
        public ParameterCounts Counts = null!;
        public IReadOnlyList<SharedStorage> Shared = [];
        public IReadOnlyList<ExpertGradientFlow> Flow = [];
        public MemoryPrediction Prediction = null!;
        public bool IsCuda;
        public List<MeasuredStep> Steps = [];

        public long PredictedPeak => RuntimeBaselineBytes + Prediction.PeakBytes;

        /// <summary>(figure, predicted, measured, verdict) rows; verdict explains any difference.</summary>
        public List<(string Figure, string Predicted, string Measured, string Note)> Rows(LoraReport r)
        {
            var plan = r.Plan;
            var rows = new List<(string, string, string, string)>();
            void Exact(string figure, long predicted, long measured, Func<long, string> fmt, string why = "") =>
                rows.Add((figure, fmt(predicted), fmt(measured), predicted == measured ? "equal" : "DIFFERENT " + why));
            Exact("adapter instances", plan.Targets.Count, AdapterInstances, Units.Count, "(the runtime wrapped other modules than the plan)");
            Exact("LoRA tensors", plan.TrainableTensors.Count, LoraTensors, Units.Count);
            Exact("per-expert-slice adapters", plan.Targets.Count(t => t.IsPerExpertSlices), PerExpertSliceAdapters, Units.Count);
            Exact("expert slices", plan.Targets.Where(t => t.IsPerExpertSlices).Sum(t => t.NumExperts), ExpertSlices, Units.Count);
            var predictedShared = plan.Targets.Count(t => t.TiedToEmbedding);
            rows.Add(("adapters sharing storage", predictedShared == 0 ? "none" : $"{predictedShared} tied",
                Shared.Count == 0 ? $"none ({DistinctAdapterStorages} distinct data pointers)" : string.Join("; ", Shared.Select(g => string.Join(" = ", g.Names))),
                (predictedShared == 0) == (Shared.Count == 0) ? "equal" : "DIFFERENT"));
            Exact("trainable parameters", plan.TrainableParameters, Counts.Trainable, Units.Count);
            Exact("all parameters", plan.AllParameters, Counts.Total, Units.Count);
            Exact("adapter memory (fp32)", r.AdapterMemoryBytes, Counts.TrainableBytes, Units.Bytes);
            long baseWeights = r.Spec.Tree.NumParameters * r.Options.DType.Bytes();
            Exact("base weights", baseWeights, Counts.TotalBytes - Counts.TrainableBytes, Units.Bytes);
            Exact($"hidden states, all {r.HiddenStates.NumStates}", r.HiddenStates.AllLayersBytes, AllStatesBytes, Units.Bytes);
            Exact($"hidden states, targets [{string.Join(",", r.HiddenStates.TargetLayers)}]", r.HiddenStates.TargetLayersBytes, TargetStatesBytes, Units.Bytes);
            if (IsCuda)
            {
                // On a GPU the model lives on the device: the host holds the runtime and CUDA libraries only, so the
                // host-side phase model does not apply; the device is compared with weights + adapters instead.
                long predicted = baseWeights + r.AdapterMemoryBytes;
                if (DeviceAfterBuildBytes is { } dev)
                {
                    var devRatio = predicted == 0 ? 0 : (double)dev / predicted;
                    rows.Add(("device memory after build", Units.Bytes(predicted), Units.Bytes(dev),
                        $"{devRatio:0.00}x of predicted ({(Math.Abs(devRatio - 1) <= 0.10 ? "within" : "outside")} 10%): weights + fp32 adapters; " +
                        "measured = in use on the device (cudaMemGetInfo) above the reading before the build, allocator reservations and workspaces included"));
                }
                rows.Add(("host peak (VmHWM)", "bounded", Units.Bytes(PeakBytes),
                    "weights are drawn or loaded straight to the device; the host holds the runtime, CUDA libraries and one staged tensor at a time"));
            }
            else
            {
                var ratio = PredictedPeak == 0 ? 0 : (double)PeakBytes / PredictedPeak;
                rows.Add(("process peak (VmHWM)", Units.Bytes(PredictedPeak), Units.Bytes(PeakBytes),
                    $"{ratio:0.00}x of predicted; rough by nature: predicted = runtime at start ({Units.Bytes(RuntimeBaselineBytes)}, measured) + " +
                    $"the largest phase ({Prediction.PeakPhase}); allocator caching, libtorch workspaces and GC heaps are not modelled"));
            }
            rows.AddRange(StepMeasurement.Rows(Steps, IsCuda));
            return rows;
        }

        /// <summary>The measured figures as report sections: predicted against measured, then gradient flow.</summary>
        public IEnumerable<Section> Sections(LoraReport r)
        {
            var rows = Rows(r).Select(x => (IReadOnlyList<Text>)[x.Figure, x.Predicted, x.Measured,
                new Text(x.Note, x.Note.StartsWith("DIFFERENT", StringComparison.Ordinal) ? Tone.Bad : Tone.Plain)]).ToList();
            Block table = new Table([new("figure"), new("predicted", Right: true), new("measured", Right: true), new("note")], rows);
            if (Flow.Count == 0)
            {
                yield return new Section("measured", "Measured (--load-model)", "measured",
                    [table, new Paragraph(MemoryNote(r)), new Paragraph("Gradient flow: no fused-expert adapters (nothing to compare with router selection).")]);
                if (Steps.Count > 0) yield return StepMeasurement.Section(Steps, IsCuda);
                yield break;
            }
            yield return new Section("measured", "Measured (--load-model)", "measured", [table, new Paragraph(MemoryNote(r))]);
            if (Steps.Count > 0) yield return StepMeasurement.Section(Steps, IsCuda);
            var flow = Flow.Select(f => (IReadOnlyList<Text>)[new Text($"{f.Module}.{f.Parameter}", Tone.Code), Experts(f.Selected, f.NumExperts),
                Experts(Where(f.GradB), f.NumExperts), Experts(Where(f.GradA), f.NumExperts),
                f.GradientOnlyWhereSelected ? "yes" : new Text("NO", Tone.Bad)]).ToList();
            yield return new Section("gradient-flow", Text.Of(new Span("Gradient flow vs router selection", Tone.Strong), new Span(" (one backward)")), "measured.gradient_flow",
            [
                new Table([new("adapter"), new("selected experts"), new("lora_B grad ≠ 0"), new("lora_A grad ≠ 0"), new("grad only where selected")], flow),
                new Paragraph(FlowSummary()),
            ]);
        }

        static IEnumerable<long> Where(bool[] b) => Enumerable.Range(0, b.Length).Where(i => b[i]).Select(i => (long)i);

        static string Experts(IEnumerable<long> e, long n)
        {
            var l = e.ToList();
            return $"{l.Count}/{n}: " + (l.Count == 0 ? "-" : string.Join(",", l));
        }

        public string FlowSummary()
        {
            int holds = Flow.Count(f => f.GradientOnlyWhereSelected);
            bool aZero = Flow.All(f => !f.GradA.Any(x => x));
            return $"Seed report §4.3 (only router-selected experts' LoRA slices receive gradient): holds for {holds}/{Flow.Count} fused-expert adapters " +
                $"(one backward over {Flow.Max(f => f.SelectedCounts.Sum())} routed (token, slot) pairs per layer)." +
                (aZero ? " lora_A got no gradient anywhere: lora_B starts at zero (init_lora_weights=True), so dL/dA = 0 on the first step; lora_B's per-expert columns carry the signal." : "");
        }

        string MemoryNote(LoraReport r)
        {
            var sb = new StringBuilder();
            sb.Append($"Memory prediction ({Prediction.PeakPhase} is the largest phase): ");
            sb.Append(string.Join("; ", Prediction.Phases.Select(p => $"{p.Name} {Units.Bytes(p.Bytes)} ({p.Detail})")));
            sb.Append(". Hidden-state and adapter figures are exact by construction of the runtime (same shapes and dtypes as transformers + PEFT);");
            sb.Append($" the forward grew the resident set by {Units.Bytes(ForwardRssGrowthBytes)} (hidden states + logits + transients, less memory reused from earlier allocations).");
            if (Prediction.MaterializedExpertBytes > 0)
                sb.Append($" MoeLora applies fused-expert LoRA as low-rank products and never builds W+ΔW; PEFT's ParamWrapper builds it for every adapted expert tensor during forward+backward ({Units.Bytes(Prediction.MaterializedExpertBytes)} at batch 1), which this prediction leaves out.");
            return sb.ToString();
        }

        public JsonObject ToJson(LoraReport r) => new()
        {
            ["rows"] = new JsonArray(Rows(r).Select(x => (JsonNode)new JsonObject
            {
                ["figure"] = x.Figure, ["predicted"] = x.Predicted, ["measured"] = x.Measured, ["note"] = x.Note,
            }).ToArray()),
            ["adapter_instances"] = AdapterInstances,
            ["lora_tensors"] = LoraTensors,
            ["trainable_parameters"] = Counts.Trainable,
            ["all_parameters"] = Counts.Total,
            ["trainable_bytes"] = Counts.TrainableBytes,
            ["base_weight_bytes"] = Counts.TotalBytes - Counts.TrainableBytes,
            ["shared_storage"] = new JsonArray(Shared.Select(g => (JsonNode)new JsonArray(g.Names.Select(n => (JsonNode)JsonValue.Create(n)).ToArray())).ToArray()),
            ["distinct_adapter_storages"] = DistinctAdapterStorages,
            ["hidden_states"] = new JsonObject
            {
                ["num_states"] = HiddenStates,
                ["dtype"] = HiddenStateDType,
                ["all_layers_bytes"] = AllStatesBytes,
                ["target_layers_bytes"] = TargetStatesBytes,
                ["forward_rss_growth_bytes"] = ForwardRssGrowthBytes,
            },
            ["memory"] = new JsonObject
            {
                ["runtime_baseline_bytes"] = RuntimeBaselineBytes,
                ["predicted_peak_bytes"] = PredictedPeak,
                ["process_peak_bytes"] = PeakBytes,
                ["device_after_build_bytes"] = DeviceAfterBuildBytes,
                ["checkpoint_bytes"] = CheckpointBytes,
                ["phases"] = new JsonArray(Prediction.Phases.Select(p => (JsonNode)new JsonObject { ["name"] = p.Name, ["bytes"] = p.Bytes, ["detail"] = p.Detail }).ToArray()),
                // What PEFT's ParamWrapper would build (W+ΔW of every adapted fused-expert tensor); not part of MoeLora's phases.
                ["peft_materialized_expert_bytes"] = Prediction.MaterializedExpertBytes,
            },
            ["steps"] = new JsonObject(Steps.Select(x => KeyValuePair.Create(x.Mode, (JsonNode?)x.ToJson()))),
            ["gradient_flow"] = new JsonArray(Flow.Select(f => (JsonNode)new JsonObject
            {
                ["module"] = f.Module,
                ["parameter"] = f.Parameter,
                ["num_experts"] = f.NumExperts,
                ["selected_counts"] = new JsonArray(f.SelectedCounts.Select(c => (JsonNode)JsonValue.Create(c)).ToArray()),
                ["experts_with_grad_b"] = new JsonArray(Where(f.GradB).Select(c => (JsonNode)JsonValue.Create(c)).ToArray()),
                ["experts_with_grad_a"] = new JsonArray(Where(f.GradA).Select(c => (JsonNode)JsonValue.Create(c)).ToArray()),
                ["gradient_only_where_selected"] = f.GradientOnlyWhereSelected,
            }).ToArray()),
        };
    }
}

/// <summary>
/// A simple memory model from Core's ModelSpec and AdapterPlan: weights = parameters × dtype bytes, adapters fp32
/// (+ their gradients), the checkpoint loader's transient copy, the forward's activations and, for fused-expert
/// LoRA, the materialised W+ΔW that autograd keeps until the backward.
/// </summary>
internal sealed record MemoryPrediction(IReadOnlyList<(string Name, long Bytes, string Detail)> Phases, long RequiredBytes, string RequiredSummary, long MaterializedExpertBytes)
{
    public long PeakBytes => Phases.Max(p => p.Bytes);
    public string PeakPhase => Phases.MaxBy(p => p.Bytes).Name;

    /// <param name="checkpointBytes">Bytes of the checkpoint's tensors (null for --init random; 0 before the headers were read).</param>
    public static MemoryPrediction Of(LoraReport r, long? checkpointBytes, int gradTokens)
    {
        var spec = r.Spec;
        int db = r.Options.DType.Bytes();
        long weights = spec.Tree.NumParameters * db;
        long adapters = r.Plan.LoraParameters * 4;
        var hs = r.HiddenStates;
        long tokens = (long)hs.BatchSize * hs.SeqLength;
        long heads = Math.Max(1, spec.NumAttentionHeads);
        long logits = tokens * spec.VocabSize * db;
        long attention = hs.BatchSize * heads * (long)hs.SeqLength * hs.SeqLength * 4 * 2;
        long forward = hs.AllLayersBytes + logits + attention;
        long largest = spec.Tree.Parameters.Max(p => p.NumElements);
        long load;
        string loadDetail;
        if (checkpointBytes is null)
        {
            load = weights + largest * (4 + db);
            loadDetail = "random init: weights + one fp32 temporary (on a GPU: drawn in place, no temporary)";
        }
        else
        {
            // The loader reads one stored tensor at a time into a host staging tensor (or straight into a CPU
            // parameter of the file's dtype); per-expert parts are copied into their fused slice on the device.
            double perParam = spec.Tree.NumParameters == 0 || checkpointBytes == 0 ? db : (double)checkpointBytes.Value / spec.Tree.NumParameters;
            load = weights + (long)(largest * perParam);
            loadDetail = "weights + one stored tensor staged on the host at a time";
        }
        long materialized = r.Plan.Targets.Where(t => t.Kind == AdapterKind.Parameter && t.NumExperts > 1)
            .Sum(t => t.BaseShape.Aggregate(1L, (a, b) => a * b) * db);
        long gradTok = gradTokens;
        long gradAct = (spec.NumHiddenLayers + 1) * gradTok * spec.HiddenSize * 4 * 8 + gradTok * spec.VocabSize * 4 * 3;
        var phases = new List<(string, long, string)>
        {
            ("load", load, loadDetail),
            ("forward", weights + adapters + forward, $"weights + adapters + all hidden states, logits, one layer's attention scores at batch {hs.BatchSize} x {hs.SeqLength}"),
            // MoeLora's experts apply fused-expert LoRA as low-rank products (Experts: x·Aᵀ·Bᵀ per expert segment) and never
            // build W+ΔW, unlike PEFT's ParamWrapper: `materialized` is reported beside the phases, not added to them.
            ("backward", weights + 2 * adapters + gradAct, $"weights + adapters and their gradients + activations of {gradTokens} tokens"),
        };
        long required = weights + adapters;
        var summary = $"{Units.Bytes(weights)} of {r.Options.DType.Name()} weights for {Units.Count(spec.Tree.NumParameters)} parameters + {Units.Bytes(adapters)} of fp32 adapters";
        return new MemoryPrediction(phases, required, summary, materialized);
    }
}
