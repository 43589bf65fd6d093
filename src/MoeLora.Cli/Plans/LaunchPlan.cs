using System.Globalization;
using System.Text;
using System.Text.Json.Nodes;
using MoeLora.Core.Analysis;
using MoeLora.Core.Memory;

namespace MoeLora.Cli.Plans;

/// <summary>
/// The files a user needs to run an analysed plan on existing engines: an accelerate config (YAML), a DeepSpeed
/// config (JSON) for the chosen ZeRO stage, PEFT's adapter_config.json (the exact LoraConfig the analysis used), and
/// the PyTorch training script with its settings and stand-in data (<see cref="TrainScript"/>), so that
/// <c>accelerate launch --config_file accelerate_config.yaml train.py</c> runs in the folder as written.
/// </summary>
public static class LaunchPlan
{
    public const string AccelerateFile = "accelerate_config.yaml";
    public const string DeepSpeedFile = "deepspeed_config.json";
    public const string PeftFile = "adapter_config.json";
    public const string SummaryFile = "moelora_plan.json";

    /// <summary>ZeRO stage written to the DeepSpeed config: 0 for DDP, 2, or 3 (ZeRO-3, FSDP and EP plans).</summary>
    public static int ZeroStage(Sharding s) => s switch { Sharding.Ddp => 0, Sharding.Zero2 => 2, _ => 3 };

    public static string DistributedType(TrainingSetup s) => s.Sharding switch
    {
        Sharding.Zero2 or Sharding.Zero3 or Sharding.Ep => "DEEPSPEED",
        Sharding.Fsdp => "FSDP",
        _ => s.Gpus > 1 ? "MULTI_GPU" : "NO",
    };

    public static string MixedPrecision(DType d) => d switch { DType.BFloat16 => "bf16", DType.Float16 => "fp16", _ => "no" };

    /// <summary>accelerate's config file (the keys <c>accelerate config</c> writes; see accelerate ClusterConfig).</summary>
    public static string AccelerateYaml(LoraReport report)
    {
        var s = report.Training.Setup;
        var type = DistributedType(s);
        var sb = new StringBuilder();
        sb.AppendLine("# Written by moelora plan: accelerate launch --config_file accelerate_config.yaml train.py");
        sb.AppendLine("compute_environment: LOCAL_MACHINE");
        sb.AppendLine("debug: false");
        // Quoted: PyYAML (YAML 1.1) reads a bare NO / no as the boolean false, which accelerate then rejects.
        sb.AppendLine(CultureInfo.InvariantCulture, $"distributed_type: '{type}'");
        sb.AppendLine("downcast_bf16: 'no'");
        sb.AppendLine("machine_rank: 0");
        sb.AppendLine("main_training_function: main");
        // FSDP: 'no'. The weights already load in the plan's dtype and PEFT casts around its fp32 adapters; with
        // bf16, accelerate's FSDP2 path upcasts the whole model to fp32 and reduces the fp32 adapter gradients in bf16,
        // which torch 2.11 refuses to assign (grad_dtype). train.py drops the DDP autocast wrapper for the same result.
        sb.AppendLine(CultureInfo.InvariantCulture, $"mixed_precision: '{(type == "FSDP" ? "no" : MixedPrecision(s.DType))}'");
        sb.AppendLine("num_machines: 1");
        sb.AppendLine(CultureInfo.InvariantCulture, $"num_processes: {s.Gpus}");
        sb.AppendLine("rdzv_backend: static");
        sb.AppendLine("same_network: true");
        sb.AppendLine("tpu_env: []");
        sb.AppendLine("tpu_use_cluster: false");
        sb.AppendLine("tpu_use_sudo: false");
        sb.AppendLine("use_cpu: false");
        if (type == "DEEPSPEED")
        {
            sb.AppendLine("deepspeed_config:");
            sb.AppendLine(CultureInfo.InvariantCulture, $"  deepspeed_config_file: {DeepSpeedFile}");
            sb.AppendLine(CultureInfo.InvariantCulture, $"  zero3_init_flag: {(ZeroStage(s.Sharding) == 3 ? "true" : "false")}");
            if (s.Sharding == Sharding.Ep) sb.AppendLine("  # expert parallelism: set the engine's ep_size / expert-parallel degree to num_processes");
        }
        else if (type == "FSDP")
        {
            var layerClass = report.Spec.Tree.Find(report.Spec.DecoderLayersPath + ".0")?.ClassName ?? "DecoderLayer";
            sb.AppendLine("fsdp_config:");
            sb.AppendLine("  fsdp_version: 2");
            sb.AppendLine("  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP");
            sb.AppendLine(CultureInfo.InvariantCulture, $"  fsdp_transformer_layer_cls_to_wrap: {layerClass}");
            sb.AppendLine("  fsdp_reshard_after_forward: true");
            sb.AppendLine("  fsdp_state_dict_type: SHARDED_STATE_DICT");
            sb.AppendLine("  fsdp_cpu_ram_efficient_loading: true");
            sb.AppendLine("  fsdp_offload_params: false");
            sb.AppendLine(CultureInfo.InvariantCulture, $"  fsdp_activation_checkpointing: {(s.GradientCheckpointing ? "true" : "false")}");
        }
        return sb.ToString();
    }

    /// <summary>DeepSpeed's JSON config (docs: deepspeed.ai/docs/config-json) for the chosen stage.</summary>
    public static JsonObject DeepSpeedJson(LoraReport report)
    {
        var s = report.Training.Setup;
        var stage = ZeroStage(s.Sharding);
        var zero = new JsonObject
        {
            ["stage"] = stage,
            ["overlap_comm"] = true,
            ["contiguous_gradients"] = true,
            ["reduce_bucket_size"] = 500_000_000,
        };
        if (stage >= 2) zero["allgather_bucket_size"] = 500_000_000;
        if (stage == 3)
        {
            zero["stage3_prefetch_bucket_size"] = 50_000_000;
            zero["stage3_param_persistence_threshold"] = 100_000;
            zero["stage3_max_live_parameters"] = 1_000_000_000;
            zero["stage3_gather_16bit_weights_on_model_save"] = true;
        }
        return new JsonObject
        {
            ["train_micro_batch_size_per_gpu"] = s.BatchSize,
            ["gradient_accumulation_steps"] = 1,
            ["train_batch_size"] = s.BatchSize * s.Gpus,
            ["gradient_clipping"] = 1.0,
            ["bf16"] = new JsonObject { ["enabled"] = s.DType == DType.BFloat16 },
            ["fp16"] = new JsonObject { ["enabled"] = s.DType == DType.Float16 },
            ["zero_optimization"] = zero,
            ["activation_checkpointing"] = new JsonObject { ["partition_activations"] = false, ["contiguous_memory_optimization"] = false },
            ["wall_clock_breakdown"] = false,
        };
    }

    /// <summary>The files <see cref="Write"/> puts in the folder.</summary>
    public static IReadOnlyList<string> FileNames => [AccelerateFile, DeepSpeedFile, PeftFile, SummaryFile, .. TrainScript.FileNames];

    /// <summary>moelora_plan.json: the model, its trainable count, the memory verdict and the launch line.</summary>
    public static JsonObject Summary(LoraReport report) => new()
    {
        ["schema"] = "moelora.plan/1",
        ["model"] = report.Options.ModelId,
        ["trainable_parameters"] = report.Plan.TrainableParameters,
        ["memory"] = TrainingMemoryJson.ToJson(report.Training),
        ["launch"] = $"accelerate launch --config_file {AccelerateFile} {TrainScript.ScriptFile}",
    };

    /// <summary>Writes every file atomically into <paramref name="dir"/> (created if missing); returns the paths.</summary>
    public static IReadOnlyList<string> Write(LoraReport report, string dir)
    {
        Directory.CreateDirectory(dir);
        var opts = new System.Text.Json.JsonSerializerOptions { WriteIndented = true };
        var files = new List<(string Name, string Text)>
        {
            (AccelerateFile, AccelerateYaml(report)),
            (DeepSpeedFile, DeepSpeedJson(report).ToJsonString(opts) + "\n"),
            (PeftFile, report.Plan.Effective.ToAdapterConfigJson(report.Options.ModelId, inferenceMode: false).ToJsonString(opts) + "\n"),
            (SummaryFile, Summary(report).ToJsonString(opts) + "\n"),
        };
        files.AddRange(TrainScript.Files(report));
        var paths = new List<string>();
        foreach (var (name, text) in files)
        {
            var path = Path.Combine(dir, name);
            Directory.CreateDirectory(Path.GetDirectoryName(path)!);
            Infrastructure.AtomicFile.WriteAllText(path, text);
            paths.Add(path);
        }
        return paths;
    }
}
