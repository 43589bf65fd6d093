using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Core.Analysis;

/// <summary>Inputs of a report besides the model and the LoraConfig.</summary>
public sealed record ReportOptions
{
    public string ModelId { get; init; } = "";

    /// <summary>Where the config came from (catalog, local, cache, hub) and any note about it.</summary>
    public string Source { get; init; } = "catalog";

    public string? SourceNote { get; init; }

    /// <summary>A short form of the note for terminals (e.g. that a catalog copy is partial).</summary>
    public string? SourceSummary { get; init; }

    public int BatchSize { get; init; } = 1;

    public int SeqLength { get; init; } = 512;

    public DType DType { get; init; } = DType.BFloat16;

    /// <summary>Circuit-breaker target layers as hidden_states indices; null means [L/4, L/2].</summary>
    public IReadOnlyList<int>? TargetLayers { get; init; }

    /// <summary>Training-memory setup (batch, sequence, dtype, target layers are taken from the fields above).</summary>
    public Memory.TrainingSetup? Training { get; init; }
}

/// <summary>The whole config-only analysis: model facts, the adapter plan, memory, warnings, recommendations.</summary>
public sealed class LoraReport
{
    public const string Schema = "moelora.report/1";

    public required ReportOptions Options { get; init; }

    public required ModelSpec Spec { get; init; }

    public required AdapterPlan Plan { get; init; }

    public required IReadOnlyList<TargetBreakdown> Breakdown { get; init; }

    public required ExpertCoverage Experts { get; init; }

    public required HiddenStatesMemory HiddenStates { get; init; }

    public required IReadOnlyList<Finding> Warnings { get; init; }

    public required IReadOnlyList<Recommendation> Recommendations { get; init; }

    /// <summary>Per-GPU peak of one training step (<see cref="Memory.TrainingMemory"/>).</summary>
    public Memory.TrainingMemory Training { get; private init; } = null!;

    /// <summary>Adapter weights as PEFT keeps them: fp32 (autocast_adapter_dtype upcasts bf16/fp16).</summary>
    public long AdapterMemoryBytes => Plan.LoraParameters * 4;

    /// <summary>modules_to_save copies stay in the base dtype.</summary>
    public long ModulesToSaveBytes => Plan.Extras.Where(e => e.CountsInTotal).Sum(e => e.NumElements) * Options.DType.Bytes();

    public static LoraReport Build(ModelSpec spec, LoraConfig config, PeftVersion? version, ReportOptions options)
    {
        var plan = AdapterPlanner.Plan(spec, config, version);
        var targets = options.TargetLayers ?? HiddenStatesMemory.DefaultTargetLayers(spec.NumHiddenLayers);
        HiddenStatesMemory.Validate(targets, spec.NumHiddenLayers);
        var hidden = new HiddenStatesMemory
        {
            BatchSize = options.BatchSize,
            SeqLength = options.SeqLength,
            DType = options.DType,
            HiddenSize = spec.HiddenSize,
            NumLayers = spec.NumHiddenLayers,
            TargetLayers = targets,
            Streams = spec.Runtime?.HyperConnections?.Streams ?? 1,
        };
        var setup = (options.Training ?? new Memory.TrainingSetup()) with
        {
            BatchSize = options.BatchSize, SeqLength = options.SeqLength, DType = options.DType, TargetLayers = targets,
        };
        // One thread: since the analysis allocates less, running the training-memory estimate on a pool thread beside
        // the recommendations costs a cold `report` of DeepSeek-V3 more (thread-pool start, a second core that a busy
        // machine may not have) than it saves; measured 1-2 ms slower (BENCHMARKS.md).
        var training = Memory.TrainingMemory.Estimate(plan, setup);
        var breakdown = TargetBreakdown.Build(plan);
        var warnings = Findings.Warnings(plan, breakdown);
        return new LoraReport
        {
            Options = options,
            Spec = spec,
            Plan = plan,
            Breakdown = breakdown,
            Experts = ExpertCoverage.Build(plan),
            HiddenStates = hidden,
            Warnings = warnings,
            Recommendations = Findings.Recommend(plan, hidden, warnings),
            Training = training,
        };
    }

    /// <summary>Adapters and LoRA parameters grouped by location, in enum order.</summary>
    public IReadOnlyList<(ModuleLocation Location, int Adapters, long Parameters)> ByLocation() =>
        Plan.Targets.GroupBy(t => t.Location).OrderBy(g => g.Key)
            .Select(g => (g.Key, g.Count(), g.Sum(t => t.NumParameters))).ToList();

    public double TrainablePercent => Plan.AllParameters == 0 ? 0 : 100.0 * Plan.TrainableParameters / Plan.AllParameters;

    /// <summary>The JSON contract <c>moelora.report/1</c> (documented in the README).</summary>
    public JsonObject ToJson()
    {
        var spec = Spec;
        var plan = Plan;
        var moe = spec.Moe;
        return new JsonObject
        {
            ["schema"] = Schema,
            ["model"] = new JsonObject
            {
                ["id"] = Options.ModelId,
                ["source"] = Options.Source,
                ["source_note"] = Options.SourceNote,
                ["model_type"] = spec.ModelType,
                ["architecture"] = spec.Architecture,
                ["layout"] = spec.DerivedLabel is null ? spec.Layout.Name() : "derived",
                ["derived"] = spec.DerivedLabel,
                ["num_parameters"] = spec.Tree.NumParameters,
                ["hidden_size"] = spec.HiddenSize,
                ["num_hidden_layers"] = spec.NumHiddenLayers,
                ["vocab_size"] = spec.VocabSize,
                ["num_attention_heads"] = spec.NumAttentionHeads,
                ["num_key_value_heads"] = spec.NumKeyValueHeads,
                ["tie_word_embeddings"] = spec.TieWordEmbeddings,
                ["num_modules"] = spec.Tree.Modules.Count,
            },
            ["moe"] = new JsonObject
            {
                ["is_moe"] = moe.IsMoe,
                ["num_experts"] = moe.NumExperts,
                ["experts_per_token"] = moe.ExpertsPerToken,
                ["shared_experts"] = moe.SharedExperts,
                ["expert_intermediate_size"] = moe.ExpertIntermediateSize,
                ["shared_expert_intermediate_size"] = moe.SharedExpertIntermediateSize,
                ["moe_layers"] = Ints(moe.MoeLayers),
                ["dense_layers"] = Ints(moe.DenseLayers),
                ["routing"] = moe.Routing,
            },
            ["peft"] = new JsonObject
            {
                ["version"] = plan.Version.ToString(),
                ["requested_config"] = plan.Requested.ToKwargsJson(),
                ["effective_config"] = plan.Effective.ToKwargsJson(),
                ["conversion"] = plan.Conversion is null ? null : new JsonObject
                {
                    ["pattern"] = plan.Conversion.Pattern,
                    ["moved"] = new JsonObject(plan.Conversion.Moved.Select(m => KeyValuePair.Create(m.Key, (JsonNode?)JsonValue.Create(m.Value)))),
                    ["gate_up_rank_doubled"] = plan.Conversion.DoubledGateUp,
                },
            },
            ["lora"] = new JsonObject
            {
                ["trainable_parameters"] = plan.TrainableParameters,
                ["all_parameters"] = plan.AllParameters,
                ["trainable_percent"] = Math.Round(TrainablePercent, 6),
                ["lora_parameters"] = plan.LoraParameters,
                ["adapter_instances"] = plan.Targets.Count,
                ["lora_tensors"] = plan.Targets.Sum(t => t.Tensors.Count),
                ["adapter_memory_bytes"] = AdapterMemoryBytes,
                ["adapter_dtype"] = "fp32",
                ["modules_to_save_bytes"] = ModulesToSaveBytes,
                ["sharing"] = Sharing(),
                ["by_location"] = new JsonObject(ByLocation().Select(x => KeyValuePair.Create(x.Location.Name(),
                    (JsonNode?)new JsonObject { ["adapters"] = x.Adapters, ["parameters"] = x.Parameters }))),
                ["experts"] = new JsonObject
                {
                    ["experts_per_layer"] = Experts.ExpertsPerLayer,
                    ["moe_layers"] = Experts.MoeLayers,
                    ["layers_with_expert_adapters"] = Experts.LayersWithExpertAdapters,
                    ["experts_with_adapters"] = Experts.ExpertsWithAdapters,
                    ["mode"] = Experts.Mode,
                },
                ["matching"] = new JsonArray(Breakdown.Select(r => (JsonNode)new JsonObject
                {
                    ["target"] = r.Target,
                    ["source"] = r.Source,
                    ["name_matches"] = r.NameMatches,
                    ["adapters"] = r.Adapters,
                    ["by_location"] = new JsonObject(r.ByLocation.Select(kv => KeyValuePair.Create(kv.Key.Name(), (JsonNode?)JsonValue.Create(kv.Value)))),
                    ["unique_shapes"] = new JsonArray(r.UniqueShapes.Select(s => (JsonNode)JsonValue.Create(s)).ToArray()),
                    ["note"] = r.Note,
                }).ToArray()),
                ["targets"] = new JsonArray(plan.Targets.Select(TargetJson).ToArray()),
                ["adapter_tensors"] = new JsonObject(plan.SavedTensors.Select(t => KeyValuePair.Create(t.SavedKey!, (JsonNode?)Ints(t.Shape)))),
                ["adapter_config"] = plan.Effective.ToAdapterConfigJson(Options.ModelId),
            },
            ["memory"] = new JsonObject
            {
                ["hidden_states"] = new JsonObject
                {
                    ["batch_size"] = HiddenStates.BatchSize,
                    ["seq_length"] = HiddenStates.SeqLength,
                    ["dtype"] = HiddenStates.DType.Name(),
                    ["num_states"] = HiddenStates.NumStates,
                    ["bytes_per_state"] = HiddenStates.BytesPerState,
                    ["streams"] = HiddenStates.Streams,
                    ["all_layers_bytes"] = HiddenStates.AllLayersBytes,
                    ["target_layers"] = Ints(HiddenStates.TargetLayers),
                    ["target_layers_bytes"] = HiddenStates.TargetLayersBytes,
                    ["saving_percent"] = Math.Round(HiddenStates.SavingPercent, 3),
                    ["truncated_layers"] = HiddenStates.TruncatedLayers,
                    ["truncated_all_states_bytes"] = HiddenStates.TruncatedStatesBytes,
                },
                ["training"] = Memory.TrainingMemoryJson.ToJson(Training),
            },
            ["warnings"] = new JsonArray(Warnings.Select(w => (JsonNode)new JsonObject { ["code"] = w.Code, ["message"] = w.Message }).ToArray()),
            ["recommendations"] = new JsonArray(Recommendations.Select(r => (JsonNode)new JsonObject
            {
                ["title"] = r.Title,
                ["detail"] = r.Detail,
                ["lora_config"] = r.Config?.ToKwargsJson(),
                ["trainable_parameters"] = r.TrainableParameters,
            }).ToArray()),
        };
    }

    /// <summary>How adapter weights relate: distinct instances, per-expert slices, tied pairs.</summary>
    public JsonObject Sharing() => new()
    {
        ["distinct_module_adapters"] = Plan.Targets.Count(t => t.Kind != AdapterKind.Parameter && !t.TiedToEmbedding),
        ["parameter_adapters"] = Plan.Targets.Count(t => t.Kind == AdapterKind.Parameter),
        ["per_expert_slice_adapters"] = Plan.Targets.Count(t => t.IsPerExpertSlices),
        ["expert_slices"] = Plan.Targets.Where(t => t.IsPerExpertSlices).Sum(t => t.NumExperts),
        ["tied_adapters"] = Plan.Targets.Count(t => t.TiedToEmbedding),
        ["shared_storage"] = Plan.Targets.Any(t => t.TiedToEmbedding),
    };

    private static JsonNode TargetJson(AdapterTarget t) => new JsonObject
    {
        ["name"] = t.Name,
        ["kind"] = t.Kind switch { AdapterKind.Linear => "linear", AdapterKind.Embedding => "embedding", AdapterKind.Conv => "conv", _ => "parameter" },
        ["location"] = t.Location.Name(),
        ["layer"] = t.Layer,
        ["r"] = t.R,
        ["alpha"] = t.Alpha,
        ["scaling"] = t.Scaling,
        ["in_features"] = t.InFeatures,
        ["out_features"] = t.OutFeatures,
        ["num_experts"] = t.NumExperts,
        ["base_class"] = t.BaseClass,
        ["base_shape"] = Ints(t.BaseShape),
        ["wrapper"] = t.WrapperPath,
        ["parameters"] = t.NumParameters,
        ["per_expert_slices"] = t.IsPerExpertSlices,
        ["tied_to_embedding"] = t.TiedToEmbedding,
    };

    private static JsonArray Ints(IEnumerable<long> values) => new(values.Select(v => (JsonNode)JsonValue.Create(v)).ToArray());

    private static JsonArray Ints(IEnumerable<int> values) => new(values.Select(v => (JsonNode)JsonValue.Create(v)).ToArray());
}
