using System.ComponentModel;
using System.Globalization;
using MoeLora.Core.Analysis;
using MoeLora.Core.Peft;
using Spectre.Console.Cli;
using MoeLora.Core;
using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Options;
using MoeLora.Core.Memory;

namespace MoeLora.Cli.Commands;

/// <summary>
/// LoRA options with PEFT's meaning. Without <c>--lora-config</c> or target options the seed report's configuration
/// is analysed (r=16, alpha=32, q/k/v/o/gate/up/down_proj); flags override fields of <c>--lora-config</c>.
/// </summary>
public class LoraSettings : ModelSettings
{
    [CommandOption("--lora-config <FILE>")]
    [Description("A PEFT adapter_config.json (or the adapter folder holding it), or a JSON object of LoraConfig keyword arguments (PEFT's names) (default: the seed report's r=16, alpha=32, q/k/v/o/gate/up/down_proj)")]
    public string? LoraConfigFile { get; init; }

    [CommandOption("-t|--target-modules <TARGETS>")]
    [Description("Names (comma-separated or repeated; exact or dot-suffix), a regex (full match), or all-linear (default: q,k,v,o,gate,up,down_proj)")]
    public string[]? TargetModules { get; init; }

    [CommandOption("--target-parameters <PARAMS>")]
    [Description("nn.Parameter names for PEFT's ParamWrapper, e.g. mlp.experts.gate_up_proj (comma-separated or repeated) (default none)")]
    public string[]? TargetParameters { get; init; }

    [CommandOption("--exclude-modules <NAMES>")]
    [Description("Names or a regex PEFT must not adapt (default none)")]
    public string[]? ExcludeModules { get; init; }

    [CommandOption("-r|--rank <R>")]
    [Description("LoRA rank r (default 16)")]
    public int? Rank { get; init; }

    // PEFT's name, as in `train`; --alpha stays accepted for existing scripts.
    [CommandOption("--lora-alpha|--alpha <ALPHA>")]
    [Description("lora_alpha (default 2r)")]
    public double? Alpha { get; init; }

    [CommandOption("--layers-to-transform <LAYERS>")]
    [Description("Decoder layers PEFT adapts (comma-separated) (default all)")]
    public string? LayersToTransform { get; init; }

    [CommandOption("--layers-pattern <NAME>")]
    [Description("The ModuleList name PEFT reads layer indices after (e.g. layers) (default: any)")]
    public string? LayersPattern { get; init; }

    [CommandOption("--use-dora")]
    [Description("Weight-decomposed LoRA (adds a magnitude vector per adapted Linear)")]
    public bool UseDora { get; init; }

    [CommandOption("--use-rslora")]
    [Description("Scale by alpha/sqrt(r) instead of alpha/r")]
    public bool UseRslora { get; init; }

    [CommandOption("--bias <MODE>")]
    [Description("Base biases to train: none, all or lora_only (default none)")]
    public string? Bias { get; init; }

    [CommandOption("--modules-to-save <NAMES>")]
    [Description("Modules PEFT copies and trains fully (e.g. lm_head) (default none)")]
    public string[]? ModulesToSave { get; init; }

    [CommandOption("--peft-version <VERSION>")]
    [Description("PEFT rules to reproduce (default 0.21; --layout v4 defaults to 0.17)")]
    public string? PeftVersion { get; init; }

    [CommandOption("--batch-size <N>")]
    [Description("Batch size for memory figures (default 1)")]
    public int BatchSize { get; init; } = 1;

    [CommandOption("--seq-length <N>")]
    [Description("Sequence length for memory figures (default 512)")]
    public int SeqLength { get; init; } = 512;

    // The model's dtype, as --model-dtype of the commands that run it (kept as an alias here).
    [CommandOption("--dtype|--model-dtype <DTYPE>")]
    [Description("Dtype of the model's weights and activations: fp32, bf16 or fp16 (default bf16)")]
    [TypeConverter(typeof(DTypeConverter))]
    public DType DType { get; init; } = DType.BFloat16;

    [CommandOption("--cb-target-layers <LAYERS>")]
    [Description("Circuit-breaker target layers as hidden_states indices (default L/4 and L/2)")]
    public string[]? CbTargetLayers { get; init; }

    [CommandOption("--quantization <Q>")]
    [Description("Base weights: none, int8 (LLM.int8) or nf4 (QLoRA 4-bit, double-quantised) (default none)")]
    [TypeConverter(typeof(QuantizationConverter))]
    public Quantization Quantization { get; init; } = Quantization.None;

    [CommandOption("--gradient-checkpointing")]
    [Description("Recompute each decoder layer in backward (keeps only layer inputs)")]
    public bool GradientCheckpointing { get; init; }

    [CommandOption("--gpus <N>")]
    [Description("Data-parallel GPUs (default 1); --batch-size is per GPU")]
    public int Gpus { get; init; } = 1;

    [CommandOption(SharedOptions.GpuMemory)]
    [Description(SharedOptions.GpuMemoryHelp)]
    [TypeConverter(typeof(MemorySizeConverter))]
    public MemorySize GpuMemory { get; init; } = new("80GiB", 80L << 30);

    [CommandOption("--sharding <S>")]
    [Description("ddp, zero2, zero3, fsdp or ep (expert parallel) (default ddp)")]
    [TypeConverter(typeof(ShardingConverter))]
    public Sharding Sharding { get; init; } = Sharding.Ddp;

    [CommandOption("--mode <MODE>")]
    [Description("lora (cross-entropy step) or circuit-breaker (the reference RR step) (default lora)")]
    [TypeConverter(typeof(TrainingModeConverter))]
    public TrainingMode Mode { get; init; } = TrainingMode.Lora;

    [CommandOption("--attention <IMPL>")]
    [Description("Attention implementation: sdpa (flash/efficient) or eager (default sdpa)")]
    [TypeConverter(typeof(AttentionConverter))]
    public AttentionImpl Attention { get; init; } = AttentionImpl.Sdpa;

    [CommandOption("--cb-full-layers")]
    [Description("Circuit breaker: keep every block (the reference's --full_layers) instead of truncating to max(target)+1")]
    public bool CbFullLayers { get; init; }

    public override Spectre.Console.ValidationResult Validate() => base.Validate() is { Successful: false } failed ? failed : OptionChecks.First(
        OptionChecks.AtLeast(Rank, 1, "-r/--rank"),
        OptionChecks.Positive(Alpha, "--lora-alpha"),
        OptionChecks.AtLeast(BatchSize, 1, "--batch-size"),
        OptionChecks.AtLeast(SeqLength, 1, "--seq-length"),
        OptionChecks.AtLeast(Gpus, 1, "--gpus"),
        OptionChecks.OneOf(Bias, "--bias", "none", "all", "lora_only"),
        OptionChecks.Parses(() => _ = ParsedPeftVersion, "--peft-version"),
        OptionChecks.Parses(() => _ = ParsedTargetLayers));

    /// <summary>The training-memory setup the flags describe (batch, seq, dtype and targets are filled by the report).</summary>
    public Core.Memory.TrainingSetup BuildTrainingSetup() => new()
    {
        BatchSize = BatchSize,
        SeqLength = SeqLength,
        DType = DType,
        Quantization = Quantization,
        GradientCheckpointing = GradientCheckpointing,
        Gpus = Gpus > 0 ? Gpus : throw new UserInputException($"--gpus must be a positive integer, got {Gpus}"),
        GpuMemoryBytes = GpuMemory.Bytes,
        Sharding = Sharding,
        Mode = Mode,
        Attention = Attention,
        TargetLayers = ParsedTargetLayers,
        CbFullLayers = CbFullLayers,
    };

    public PeftVersion? ParsedPeftVersion => PeftVersion is null ? null : Core.Peft.PeftVersion.Parse(PeftVersion);

    public IReadOnlyList<int>? ParsedTargetLayers => CbTargetLayers is null ? null : ParseInts(CbTargetLayers, "--cb-target-layers");

    /// <summary>Builds the LoraConfig the flags describe (file first, then flags on top).</summary>
    public LoraConfig BuildLoraConfig()
    {
        LoraConfig config;
        if (LoraConfigFile is not null)
        {
            // An adapter folder (as save_pretrained writes it) is as good as its adapter_config.json.
            var file = LoraConfigPath(LoraConfigFile);
            if (!File.Exists(file)) throw new FileNotFoundException($"--lora-config {file} does not exist");
            // A file named adapter_config.json is loaded as PEFT loads one (unknown keys dropped with a warning);
            // any other JSON is read as LoraConfig keyword arguments unless it holds peft_type.
            config = LoraConfig.FromJson(File.ReadAllText(file), file,
                Path.GetFileName(file) == "adapter_config.json" ? LoraConfigSource.AdapterConfig : null);
        }
        else
        {
            config = LoraConfig.SeedDefault;
            if (TargetModules is not null || TargetParameters is not null)
                config = config with { TargetModules = TargetModules is null ? ModuleSelector.List([]) : config.TargetModules };
        }
        if (TargetModules is not null) config = config with { TargetModules = Selector(TargetModules) };
        if (TargetParameters is not null) config = config with { TargetParameters = Split(TargetParameters) };
        if (ExcludeModules is not null) config = config with { ExcludeModules = Selector(ExcludeModules) };
        if (Rank is not null) config = config with { R = Rank.Value, LoraAlpha = Alpha ?? 2.0 * Rank.Value };
        if (Alpha is not null) config = config with { LoraAlpha = Alpha.Value };
        if (LayersToTransform is not null) config = config with { LayersToTransform = ParseInts([LayersToTransform], "--layers-to-transform") };
        if (LayersPattern is not null) config = config with { LayersPattern = [LayersPattern] };
        if (UseDora) config = config with { UseDora = true };
        if (UseRslora) config = config with { UseRslora = true };
        if (Bias is not null) config = config with { Bias = Bias };
        if (ModulesToSave is not null) config = config with { ModulesToSave = Split(ModulesToSave) };
        config.Validate();
        return config;
    }

    private static readonly char[] RegexChars = ['\\', '^', '$', '*', '+', '?', '(', ')', '[', ']', '{', '}', '|'];

    /// <summary>A single value with regex syntax (or all-linear) is a regex, as a str is for PEFT; otherwise names.</summary>
    internal static ModuleSelector Selector(string[] values)
    {
        if (values.Length == 1 && (values[0].Equals("all-linear", StringComparison.OrdinalIgnoreCase) || values[0].IndexOfAny(RegexChars) >= 0))
            return ModuleSelector.Regex(values[0]);
        return ModuleSelector.List(Split(values));
    }

    /// <summary>-t as a JSON value for an adapter_config.json: a regex (or all-linear) stays a str, names a list.</summary>
    internal static System.Text.Json.Nodes.JsonNode TargetModulesJson(string[] values) =>
        values.Length == 1 && (values[0].Equals("all-linear", StringComparison.OrdinalIgnoreCase) || values[0].IndexOfAny(RegexChars) >= 0)
            ? System.Text.Json.Nodes.JsonValue.Create(values[0])
            : new System.Text.Json.Nodes.JsonArray(Split(values).Select(v => (System.Text.Json.Nodes.JsonNode)System.Text.Json.Nodes.JsonValue.Create(v)).ToArray());

    /// <summary>An adapter folder (as save_pretrained writes it) stands for its adapter_config.json.</summary>
    internal static string LoraConfigPath(string given) =>
        Directory.Exists(given) ? Path.Combine(given, "adapter_config.json") : given;

    internal static List<string> Split(IEnumerable<string> values) =>
        values.SelectMany(v => v.Split([',', ' '], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries)).ToList();

    internal static List<int> ParseInts(IEnumerable<string> values, string option) =>
        Split(values).Select(v => int.TryParse(v, NumberStyles.Integer, CultureInfo.InvariantCulture, out var i)
            ? i : throw new UserInputException($"{option}: '{v}' is not an integer")).ToList();
}
