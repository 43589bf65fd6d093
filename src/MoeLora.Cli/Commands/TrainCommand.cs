using System.ComponentModel;
using MoeLora.Core.Architectures;
using System.Globalization;
using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Options;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Training;
using Spectre.Console;
using Spectre.Console.Cli;
using TorchSharp;
using ScalarType = TorchSharp.torch.ScalarType;
using DeviceType = TorchSharp.DeviceType;
using MoeLora.Core;

namespace MoeLora.Cli.Commands;

/// <summary>Options shared by <c>train</c> and <c>eval</c>: model, preset, target layers, data shaping, device.</summary>
public class CbCommonSettings : CommandSettings
{
    [CommandOption("--model <DIR>")]
    [Description("Local model folder (config.json, *.safetensors, tokenizer.json). Omit with --preset tiny (default: the tiny preset's built-in model)")]
    public string? Model { get; init; }

    [CommandOption("--preset <NAME>")]
    [Description("llama-4-scout, mixtral-8x7b, qwen3-30b-a3b, llama-3-8b or tiny (default tiny without --model)")]
    public string? Preset { get; init; }

    [CommandOption("--cb-target-layers <LAYERS>")]
    [Description("Rerouting layers as hidden_states indices (0 = embeddings), comma-separated; default: the preset's")]
    public string? CbTargetLayers { get; init; }

    [CommandOption("--full-layers")]
    [Description("Keep every block (default: truncate to max(target)+1 blocks, as the reference)")]
    public bool FullLayers { get; init; }

    [CommandOption("--chat-template <NAME>")]
    [Description("llama3, llama4, qwen, mistral or plain (default: from model_type)")]
    public string? ChatTemplate { get; init; }

    [CommandOption("--request-length <N>")] [Description("CB request tokens, left-padded (default: preset, 512)")]
    public int? RequestLength { get; init; }
    [CommandOption("--response-length <N>")] [Description("CB response tokens, right-padded (default: preset, 512)")]
    public int? ResponseLength { get; init; }
    [CommandOption("--retain-length <N>")] [Description("Retain tokens, left-padded (default: preset, 1024)")]
    public int? RetainLength { get; init; }

    [CommandOption("--batch-size <N>")] [Description("Examples per micro-batch (default: preset)")]
    public int? BatchSize { get; init; }

    [CommandOption(SharedOptions.ModelDType)] [Description("Base model dtype: fp32 or bf16 (LoRA and norms stay float32) (default fp32)")]
    [TypeConverter(typeof(DTypeConverter))]
    public Core.Analysis.DType ModelDType { get; init; } = Core.Analysis.DType.Float32;

    // The old spelling of --model-dtype bf16, kept for scripts.
    [CommandOption("--bf16", IsHidden = true)] [Description("Same as --model-dtype bf16")]
    public bool Bf16 { get; init; }

    /// <summary>The base model's dtype: --model-dtype, or bf16 for the old --bf16 flag.</summary>
    public bool IsBf16 => Bf16 || ModelDType == Core.Analysis.DType.BFloat16;

    // A method, not a property: the command-line parser reflects over every settings property of every command at
    // start-up, and a TorchSharp-typed property would load TorchSharp for the analysis commands too.
    public ScalarType ModelScalarType() => IsBf16 ? ScalarType.BFloat16 : ScalarType.Float32;

    [CommandOption(SharedOptions.Device)] [Description(SharedOptions.DeviceHelp)]
    public DeviceName Device { get; init; } = DeviceName.Cpu;

    public override ValidationResult Validate() => OptionChecks.First(
        OptionChecks.Parses(() => ResolvePreset()),
        OptionChecks.AtLeast(RequestLength, 1, "--request-length"),
        OptionChecks.AtLeast(ResponseLength, 1, "--response-length"),
        OptionChecks.AtLeast(RetainLength, 1, "--retain-length"),
        OptionChecks.AtLeast(BatchSize, 1, "--batch-size"),
        ModelDType == Core.Analysis.DType.Float16 ? "--model-dtype 'fp16': training runs in fp32 or bf16" : null,
        OptionChecks.Parses(() => { if (CbTargetLayers is not null) LoraSettings.ParseInts([CbTargetLayers], "--cb-target-layers"); }),
        OptionChecks.Parses(() => { if (ChatTemplate is not null) Torch.Training.ChatTemplate.Get(ChatTemplate); }));

    public TrainPreset ResolvePreset() => TrainPreset.Get(Preset ?? (Model is null ? "tiny" : "llama-3-8b"));

    public string? ModelDir(TrainPreset preset)
    {
        if (Model is null)
        {
            if (preset.Name == "tiny") return null;
            throw new UserInputException($"--preset {preset.Name} needs --model DIR: a local folder with the weights of {preset.ModelId} (config.json, *.safetensors, tokenizer.json).");
        }
        if (!Directory.Exists(Model)) throw new UserInputException($"--model {Model}: not a folder (download the checkpoint first; training needs local weights).");
        if (!File.Exists(Path.Combine(Model, "config.json"))) throw new UserInputException($"--model {Model}: no config.json there.");
        return Model;
    }

    public IReadOnlyList<int> TargetLayers(TrainPreset preset) =>
        CbTargetLayers is null ? preset.TargetLayers : LoraSettings.ParseInts([CbTargetLayers], "--cb-target-layers");

    public CbLengths Lengths(TrainPreset preset) =>
        new(RequestLength ?? preset.Lengths.Request, ResponseLength ?? preset.Lengths.Response, RetainLength ?? preset.Lengths.Retain);

    public string TemplateName(string? modelDir) => ChatTemplate ?? Torch.Training.ChatTemplate.ForModelType(CbModels.ModelType(modelDir));
}

public sealed class TrainSettings : CbCommonSettings
{
    [CommandOption("-o|--output <DIR>")] [Description("Write the run here (a new or empty folder): adapter, metrics.jsonl, loss_curves.png/svg, checkpoint/ (required)")]
    public string? Output { get; init; }

    [CommandOption("--cb-data <FILE>")] [Description("Circuit-breaker JSONL: {\"prompt\", \"output\"} (default for tiny: the tool's embedded copy of data/tiny/cb_train.jsonl)")]
    public string? CbData { get; init; }
    [CommandOption("--retain-data <FILE>")] [Description("Retain JSONL: {\"messages\"} or {\"prompt\", \"response\"} (default for tiny: the tool's embedded copy of data/tiny/retain_train.jsonl; required otherwise)")]
    public string? RetainData { get; init; }
    [CommandOption("--refusal-data <FILE>")] [Description("Optional refusal JSONL {\"prompt\", \"refusal\"}, added to the retain set (default for tiny without --retain-data: the embedded data/tiny/refusal.jsonl; none otherwise)")]
    public string? RefusalData { get; init; }
    [CommandOption("--cb-drop-prompt <P>")] [Description("Share of CB examples trained without their prompt (upstream Llama-3: 0.5; default 0)")]
    public double CbDropPrompt { get; init; }

    [CommandOption("--lora-config <FILE>")] [Description("A PEFT adapter_config.json (or the adapter folder holding it) to train; LoRA flags override its fields (default: the preset's LoRA)")]
    public string? LoraConfig { get; init; }
    [CommandOption("-r|--rank <R>")] [Description("LoRA rank r (default: the preset's)")] public int? Rank { get; init; }
    [CommandOption("--lora-alpha|--alpha <A>")] [Description("lora_alpha (default: the preset's)")] public double? LoraAlpha { get; init; }
    [CommandOption("--lora-dropout <P>")] [Description("lora_dropout (default: the preset's)")] public double? LoraDropout { get; init; }
    [CommandOption("-t|--target-modules <TARGETS>")] [Description("Names (comma-separated or repeated; exact or dot-suffix), a regex (full match), or all-linear (default: the preset's)")]
    public string[]? TargetModules { get; init; }
    [CommandOption("--target-parameters <PARAMS>")] [Description("nn.Parameter names for PEFT's ParamWrapper, e.g. mlp.experts.gate_up_proj (comma-separated or repeated; 'none' to clear; default: the preset's)")]
    public string[]? TargetParameters { get; init; }
    [CommandOption("--layers-to-transform <LAYERS>")] [Description("Blocks LoRA adapts (default 0..max target)")]
    public string? LayersToTransform { get; init; }
    [CommandOption("--init-lora-weights <MODE>")] [Description("true (B=0, the default), gaussian or false")]
    public string? InitLoraWeights { get; init; }
    [CommandOption("--train-router")] [Description("Also train the router weights fully (saved as router.safetensors); default frozen")]
    public bool TrainRouter { get; init; }
    [CommandOption("--gradient-checkpointing")] [Description("Recompute each decoder layer in backward, keeping about two hidden states per layer instead of its activations (needs --lora-dropout 0)")]
    public bool GradientCheckpointing { get; init; }

    [CommandOption("--total-steps <N>")] [Description("Optimizer steps (default: the preset's; tiny 150)")] public int? TotalSteps { get; init; }
    [CommandOption("--gradient-accumulation <N>")] [Description("Micro-batches per optimizer step (default 1)")] public int GradientAccumulation { get; init; } = 1;
    [CommandOption("--lr <LR>")] [Description("AdamW learning rate (default: the preset's)")] public double? Lr { get; init; }
    [CommandOption("--lr-schedule <KIND>")] [Description("constant (reference; default), linear or cosine")]
    public string LrSchedule { get; init; } = "constant";
    [CommandOption("--warmup-steps <N>")] [Description("Linear warm-up steps of the learning rate (default 0)")] public int WarmupSteps { get; init; }
    [CommandOption("--weight-decay <WD>")] [Description("AdamW weight decay (default 0)")] public double WeightDecay { get; init; }
    [CommandOption("--max-grad-norm <N>")] [Description("Gradient clipping (default 1.0; 0 disables)")]
    public double MaxGradNorm { get; init; } = 1.0;
    [CommandOption("--loss-weighting <KIND>")] [Description("dual (reference: c_cb=a(1-t/2T), c_retain=a*t/2T), constant or linear (default dual)")]
    public string LossWeighting { get; init; } = "dual";
    [CommandOption("--cb-alpha <A>")] [Description("Coefficient scale a (lorra_alpha; default: preset)")]
    public double? CbAlpha { get; init; }
    [CommandOption(SharedOptions.Seed)] [Description("Seed for data order, dropout and prompt dropping (default 42)")] public long Seed { get; init; } = 42;
    [CommandOption("--checkpoint-every <N>")] [Description("Save OUTPUT/checkpoint every N steps (default 50; 0 only at the end)")] public int CheckpointEvery { get; init; } = 50;
    [CommandOption("--resume")] [Description("Continue from OUTPUT/checkpoint (same settings)")]
    public bool Resume { get; init; }
    [CommandOption("--overwrite")] [Description("Start a new run in an OUTPUT that already holds one (its adapter, checkpoint and metrics are replaced) or other files")]
    public bool Overwrite { get; init; }
    [CommandOption("--max-memory-gb <GB>")] [Description("Memory available to the run (default: the device's free memory: RAM on cpu, the GPU's own figure on cuda)")]
    public double? MaxMemoryGb { get; init; }
    [CommandOption("--threads <N>")] [Description("CPU threads for torch (default 1 for tiny, where more threads only contend; else torch's choice)")]
    public int? Threads { get; init; }
    [CommandOption("--plan-only")] [Description("Print the plan and exit (default off)")]
    public bool PlanOnly { get; init; }

    // Every value is checked before anything is loaded or written; a bad one is a malformed command line (exit 2).
    public override ValidationResult Validate() => base.Validate() is { Successful: false } failed ? failed : OptionChecks.First(
        Output is null ? "--output DIR is required" : null,
        Resume && Overwrite ? "--resume and --overwrite contradict each other: continue the run, or replace it" : null,
        OptionChecks.AtLeast(Threads, 1, "--threads"),
        OptionChecks.AtLeast(Rank, 1, "-r/--rank"),
        OptionChecks.Positive(LoraAlpha, "--lora-alpha"),
        OptionChecks.Between(LoraDropout, 0, 1, "--lora-dropout", inclusiveHigh: false),
        GradientCheckpointing && LoraDropout > 0 ? $"--gradient-checkpointing needs --lora-dropout 0, got {LoraDropout}: a recomputed layer would draw new dropout masks" : null,
        OptionChecks.Between(CbDropPrompt, 0, 1, "--cb-drop-prompt"),
        OptionChecks.AtLeast(TotalSteps, 1, "--total-steps"),
        OptionChecks.AtLeast(GradientAccumulation, 1, "--gradient-accumulation"),
        OptionChecks.Positive(Lr, "--lr"),
        OptionChecks.OneOf(LrSchedule, "--lr-schedule", Torch.Training.LrSchedule.Kinds),
        OptionChecks.AtLeast(WarmupSteps, 0, "--warmup-steps"),
        TotalSteps is { } total && WarmupSteps > total ? $"--warmup-steps {WarmupSteps}: must not exceed --total-steps {total}" : null,
        OptionChecks.NonNegative(WeightDecay, "--weight-decay"),
        OptionChecks.NonNegative(MaxGradNorm, "--max-grad-norm"),
        OptionChecks.OneOf(LossWeighting, "--loss-weighting", CoefficientSchedule.Kinds),
        OptionChecks.Positive(CbAlpha, "--cb-alpha"),
        OptionChecks.AtLeast(CheckpointEvery, 0, "--checkpoint-every"),
        OptionChecks.Positive(MaxMemoryGb, "--max-memory-gb"),
        OptionChecks.OneOf(InitLoraWeights, "--init-lora-weights", "true", "false", "gaussian"),
        OptionChecks.Parses(() => { if (LayersToTransform is not null) LoraSettings.ParseInts([LayersToTransform], "--layers-to-transform"); }));
}

public sealed class TrainCommand : Command<TrainSettings>
{
    public override int Execute(CommandContext context, TrainSettings s, CancellationToken cancellationToken)
    {
        // SIGINT (Ctrl-C) and SIGTERM (schedulers, docker stop) both ask the run to stop at the next step boundary with a
        // checkpoint; a second signal ends the process at once.
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        void OnSignal(System.Runtime.InteropServices.PosixSignalContext c)
        {
            if (cts.IsCancellationRequested) return;
            c.Cancel = true;
            cts.Cancel();
        }
        using var sigint = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGINT, OnSignal);
        using var sigterm = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGTERM, OnSignal);
        return Train(s, cts.Token);
    }

    static int Train(TrainSettings s, CancellationToken cancel)
    {
        var console = Consoles.Out;
        if (s.Output is null) throw new UsageException("--output DIR is required.");
        var preset = s.ResolvePreset();
        if (s.PlanOnly && s.Model is null && preset.Name != "tiny") return PlanFromCatalog(s, preset);
        var modelDir = s.ModelDir(preset);
        var targets = s.TargetLayers(preset);
        int modelLayers = CbModels.ModelLayers(modelDir);
        int layers = CbModels.TruncatedLayers(targets, modelLayers, s.FullLayers);
        var lengths = s.Lengths(preset);
        int batch = s.BatchSize ?? preset.BatchSize;
        int totalSteps = s.TotalSteps ?? preset.TotalSteps;
        var dtype = s.ModelScalarType();
        var weighting = CoefficientSchedule.Create(s.LossWeighting, s.CbAlpha ?? preset.Alpha, totalSteps);
        Torch.Training.LrSchedule.Create(s.LrSchedule, s.Lr ?? preset.LearningRate, totalSteps, s.WarmupSteps);
        var loraJson = BuildLoraJson(s, preset, modelDir, layers);
        var wholeConfig = modelDir is null ? TrainPreset.TinyConfigJson() : File.ReadAllText(Path.Combine(modelDir, "config.json"));
        // The device first: a CUDA request decides which libtorch loads, and the fit check asks that GPU for its free memory.
        var device = RuntimeDevice.Select(s.Device.Text);
        double availableGb = AvailableGb(s, device);
        // Sized from the config and the planned adapters before any weight is loaded.
        if (s.GradientCheckpointing && JsonNode.Parse(loraJson)?["lora_dropout"]?.GetValue<double>() is > 0 and var dropout)
            throw new UserInputException($"--gradient-checkpointing needs lora_dropout 0 (the run's is {dropout}): a recomputed layer would draw new dropout masks; add --lora-dropout 0.");
        var memory = TrainMemoryPlan.Estimate(wholeConfig, loraJson, batch, Math.Max(lengths.Request + lengths.Response, lengths.Retain),
            targets, s.IsBf16, s.FullLayers, availableGb, s.GradientCheckpointing);
        if (!memory.Fits)
            throw new UserInputException($"refusing to start: {memory.Verdict} (train itself offers --batch-size, the lengths and --bf16; --max-memory-gb plans against another size)");

        var runSettings = RunSettings(s, loraJson, targets, lengths, batch, totalSteps, weighting.Alpha, preset);
        if (!s.PlanOnly) RunFolder.Check(s.Output, s.Resume, s.Overwrite, runSettings);

        var sw = System.Diagnostics.Stopwatch.StartNew();
        if (device.type == DeviceType.CPU && (s.Threads ?? (preset.Name == "tiny" ? 1 : null)) is { } threads) torch.set_num_threads(threads);
        using var model = modelDir is null ? CbModels.Load(modelDir, layers, dtype, device)
            : RuntimeDevice.Load($"loading {modelDir}", p => CbModels.Load(modelDir, layers, dtype, device, p));
        model.GradientCheckpointing = s.GradientCheckpointing;
        var adapter = CbModels.InjectAdapter(model, loraJson, s.Seed, modelDir is null ? null : Path.GetFullPath(modelDir), wholeConfig);
        CbModels.CheckRouterFrozen(adapter, s.TrainRouter);
        var routers = s.TrainRouter ? CbModels.UnfreezeRouters(model) : null;
        var counts = Measurements.CountParameters(model);
        var grid = new Grid().AddColumn().AddColumn();
        void Row(string k, string v) => grid.AddRow(new Markup($"[grey]{Markup.Escape(k)}[/]"), new Markup(Markup.Escape(v)));
        Row("model", modelDir ?? "tiny (random Mixtral-style MoE, seed 0)");
        Row("blocks", $"{layers} of {modelLayers} (hidden_states 0..{layers}; targets {string.Join(",", targets)})");
        Row("LoRA", $"{adapter.Wrappers.Count} wrappers, {counts.Trainable.ToString("N0", CultureInfo.InvariantCulture)} trainable of {counts.Total.ToString("N0", CultureInfo.InvariantCulture)}; router {(s.TrainRouter ? "trained" : "frozen")}");
        // With truncation the saved adapter still covers the whole model (PEFT wraps fused experts in every block);
        // say what PEFT will count when it loads the file, not only what this truncated run trains.
        if (adapter.SavePlan is { } whole && whole.TrainableParameters != counts.Trainable)
            Row("saved adapter", $"{whole.TrainableParameters.ToString("N0", CultureInfo.InvariantCulture)} trainable on the whole model, as PEFT counts it (blocks {layers}..{modelLayers - 1} saved untrained, lora_B = 0)");
        Row("schedule", $"{totalSteps} steps × batch {batch} × accumulation {s.GradientAccumulation}; lr {s.Lr ?? preset.LearningRate} {s.LrSchedule}; loss weighting {s.LossWeighting} (a={weighting.Alpha})");
        Row("lengths", $"CB {lengths.Request}+{lengths.Response}, retain {lengths.Retain}; dtype {(s.IsBf16 ? "bf16" : "fp32")}; device {s.Device}" +
            (s.GradientCheckpointing ? "; gradient checkpointing" : ""));
        Row("memory plan", TrainMemoryPlan.Describe(memory));
        console.Write(grid);
        if (s.PlanOnly) return ExitCodes.Ok;

        var tokenizer = CbModels.Tokenizer(modelDir);
        var loader = new CbDataLoader(tokenizer, Torch.Training.ChatTemplate.Get(s.TemplateName(modelDir)), lengths);
        string DefaultData(string? given, string file, string flag) =>
            given ?? (preset.Name == "tiny" ? FindTinyData(file) : throw new UserInputException($"{flag} FILE is required."));
        var cb = loader.LoadCircuitBreaker(DefaultData(s.CbData, "cb_train.jsonl", "--cb-data"), s.CbDropPrompt, s.Seed);
        var retain = loader.LoadRetain(DefaultData(s.RetainData, "retain_train.jsonl", "--retain-data"));
        var refusal = s.RefusalData ?? (preset.Name == "tiny" && s.RetainData is null ? FindTinyData("refusal.jsonl") : null);
        if (refusal is not null) retain.AddRange(loader.LoadRetain(refusal));
        var data = new CbDataset(cb, retain, batch, s.Seed);
        console.MarkupLine($"[grey]data[/]      {cb.Count} circuit-breaker, {retain.Count} retain examples ({data.BatchesPerEpoch} batches per epoch)");

        // Nothing has been written yet: a signal during loading ends the command here with nothing left behind.
        if (cancel.IsCancellationRequested) throw new OperationCanceledException("interrupted before training started; nothing was written.");
        var folder = RunFolder.Create(s.Output, s.Resume, s.Overwrite);
        try
        {
            return RunTraining(s, folder, model, adapter, data, routers, targets, weighting.Alpha, totalSteps, preset, modelDir, runSettings, sw, cancel);
        }
        catch
        {
            folder.CleanUpAfterFailure();
            throw;
        }
    }

    static int RunTraining(TrainSettings s, RunFolder folder, Torch.Models.CausalLm model, InjectedAdapter adapter, CbDataset data,
        IReadOnlyList<(string Name, TorchSharp.Modules.Parameter Param)>? routers, IReadOnlyList<int> targets, double alpha, int totalSteps,
        TrainPreset preset, string? modelDir, JsonObject runSettings, System.Diagnostics.Stopwatch sw, CancellationToken cancel)
    {
        var console = Consoles.Out;
        var trainer = new CircuitBreakerTrainer(model, adapter, data, new TrainOptions
        {
            TargetLayers = targets, Alpha = alpha, LossWeighting = s.LossWeighting, TotalSteps = totalSteps,
            LearningRate = s.Lr ?? preset.LearningRate, LrSchedule = s.LrSchedule, WarmupSteps = s.WarmupSteps,
            WeightDecay = s.WeightDecay, MaxGradNorm = s.MaxGradNorm, GradientAccumulation = s.GradientAccumulation,
            Seed = s.Seed, CheckpointEvery = s.CheckpointEvery, OutputDir = folder.Path, Settings = runSettings,
        }, routers);
        if (s.Resume) { trainer.Resume(); console.MarkupLine($"[grey]resumed[/]   at step {trainer.Step}"); }
        else trainer.Start();

        TrainOutcome outcome;
        StepMetrics? first = null, last = null;
        if (console.Profile.Capabilities.Interactive)
        {
            outcome = TrainOutcome.Completed;
            console.Progress().Columns(new TaskDescriptionColumn { Alignment = Justify.Left }, new ProgressBarColumn(), new PercentageColumn(), new RemainingTimeColumn())
                .Start(ctx =>
                {
                    var task = ctx.AddTask("training", maxValue: totalSteps);
                    task.Value = trainer.Step;
                    outcome = trainer.Run(m => { first ??= m; last = m; task.Value = m.Step; task.Description = Describe(m); }, cancel);
                });
        }
        else
        {
            int every = Math.Max(1, totalSteps / 15);
            console.Profile.Width = Math.Max(console.Profile.Width, 140);
            outcome = trainer.Run(m =>
            {
                first ??= m; last = m;
                if (m.Step % every == 0 || m.Step == 1 || m.Step == totalSteps) console.WriteLine(Describe(m));
            }, cancel);
        }

        // The chart is a convenience: a host without SkiaSharp's native library (the GPU smoke bundle leaves it out when
        // the device's size limit needs the room) still gets its adapter and metrics.jsonl.
        try { MetricsPlot.Write(trainer.MetricsPath, Path.Combine(folder.Path, "loss_curves")); }
        catch (Exception e) when (e is DllNotFoundException or TypeInitializationException)
        {
            console.MarkupLine($"[yellow]loss_curves not drawn[/]: {Markup.Escape(e.GetBaseException().Message)} (metrics.jsonl has every value)");
        }
        if (outcome == TrainOutcome.Interrupted)
        {
            console.MarkupLine($"[yellow]interrupted[/] at step {trainer.Step}: checkpoint saved in {Markup.Escape(trainer.CheckpointDir)}; continue with --resume.");
            return ExitCodes.Interrupted;
        }
        trainer.SaveAdapter(folder.Path);
        if (modelDir is null) AtomicFile.WriteAllText(Path.Combine(folder.Path, "tokenizer.json"), TrainPreset.TinyTokenizerJson());
        console.MarkupLine($"[green]done[/] {totalSteps} steps in {sw.Elapsed.TotalSeconds:F1} s: adapter_config.json + adapter_model.safetensors in {Markup.Escape(folder.Path)}" +
            (first is null || last is null ? "" : $" (CB cosine {first.CbCosine:F3} → {last.CbCosine:F3}, retain loss {last.RetainLoss:F3})"));
        return ExitCodes.Ok;
    }

    /// <summary>
    /// What the run was started with that --resume must not change (the adapter's shape and targets, the optimizer
    /// and its schedule, the loss, and what each step consumes); stored in every checkpoint.
    /// </summary>
    static JsonObject RunSettings(TrainSettings s, string loraJson, IReadOnlyList<int> targets, CbLengths lengths, int batch,
        int totalSteps, double alpha, TrainPreset preset)
    {
        var lora = JsonNode.Parse(loraJson)!.AsObject();
        var kept = new JsonObject();
        foreach (var key in new[] { "r", "lora_alpha", "lora_dropout", "target_modules", "target_parameters", "layers_to_transform", "init_lora_weights", "use_dora", "use_rslora" })
            kept[key] = lora[key]?.DeepClone();
        return new JsonObject
        {
            ["lora"] = kept,
            ["run"] = new JsonObject
            {
                ["total_steps"] = totalSteps, ["seed"] = s.Seed, ["lr"] = s.Lr ?? preset.LearningRate, ["lr_schedule"] = s.LrSchedule,
                ["warmup_steps"] = s.WarmupSteps, ["weight_decay"] = s.WeightDecay, ["max_grad_norm"] = s.MaxGradNorm,
                ["loss_weighting"] = s.LossWeighting, ["cb_alpha"] = alpha, ["gradient_accumulation"] = s.GradientAccumulation,
                ["batch_size"] = batch, ["cb_target_layers"] = new JsonArray(targets.Select(t => (JsonNode)t).ToArray()),
                ["request_length"] = lengths.Request, ["response_length"] = lengths.Response, ["retain_length"] = lengths.Retain,
                ["train_router"] = s.TrainRouter,
            },
        };
    }

    static string Describe(StepMetrics m) => string.Create(CultureInfo.InvariantCulture,
        $"step {m.Step,4}/{m.TotalSteps}  loss {m.Loss:F4}  retain {m.RetainLoss:F4} (c {m.RetainCoeff:F2})  rr {m.CbLoss:F4} (c {m.CbCoeff:F2})  cos {m.CbCosine:F3}  |g| {m.GradNorm:F3}");

    /// <summary>The tiny preset's data file: the copy embedded in the tool, so the preset runs from any folder.</summary>
    internal static string FindTinyData(string file) => TinyData.PathOf(file);

    /// <summary>The adapter_config.json to train: --lora-config, else the preset's LoRA with flags on top; layers_to_transform default 0..blocks-1.</summary>
    /// <summary>The memory to plan against: --max-memory-gb, else the device's free memory (the GPU's own figure on CUDA).</summary>
    static double AvailableGb(TrainSettings s, torch.Device device) =>
        s.MaxMemoryGb ?? (device.type == DeviceType.CPU
            ? GC.GetGCMemoryInfo().TotalAvailableMemoryBytes / (1024.0 * 1024 * 1024)
            : DeviceMemory.Free(device).Bytes / (1024.0 * 1024 * 1024));

    /// <summary>--plan-only from the catalog loads nothing, so a CUDA plan needs --max-memory-gb unless the GPU can be asked.</summary>
    static double PlanOnlyGb(TrainSettings s)
    {
        if (s.MaxMemoryGb is { } gb) return gb;
        try { return AvailableGb(s, RuntimeDevice.Select(s.Device.Text)); }
        catch (UserInputException e) { throw new UserInputException($"{e.Message} (--max-memory-gb plans without asking the device)"); }
    }

    /// <summary>
    /// --plan-only for a real-model preset without local weights: the preset's model config from the embedded catalog,
    /// the LoRA the run would use, and the training-memory verdict; nothing is loaded.
    /// </summary>
    static int PlanFromCatalog(TrainSettings s, TrainPreset preset)
    {
        // An instruct model has its base model's architecture: fall back to the base config when only that is embedded.
        var candidates = preset.ModelId is { } id ? new[] { id, id.Replace("-Instruct", "", StringComparison.Ordinal) } : [];
        var modelId = candidates.FirstOrDefault(c => Core.Catalog.ModelCatalog.Find(c) is not null)
            ?? throw new UserInputException($"--preset {preset.Name}: {preset.ModelId} is not in the embedded catalog; pass --model DIR.");
        Core.Catalog.ModelCatalog.TryGetConfigJson(modelId, out var config);
        var spec = ArchitectureRegistry.Build(Core.Config.ModelConfig.Parse(config, modelId), Core.Modules.Layout.V5);
        var targets = s.TargetLayers(preset);
        int layers = CbModels.TruncatedLayers(targets, (int)spec.NumHiddenLayers, s.FullLayers);
        var lengths = s.Lengths(preset);
        int batch = s.BatchSize ?? preset.BatchSize;
        var loraJson = BuildLoraJson(s, preset, null, layers);
        var (memory, plan) = TrainMemoryPlan.EstimateWithPlan(config, loraJson, batch, Math.Max(lengths.Request + lengths.Response, lengths.Retain),
            targets, s.IsBf16, s.FullLayers, PlanOnlyGb(s), s.GradientCheckpointing);
        var grid = new Grid().AddColumn().AddColumn();
        void Row(string k, string v) => grid.AddRow(new Markup($"[grey]{Markup.Escape(k)}[/]"), new Markup(Markup.Escape(v)));
        Row("model", $"{modelId} (config from the embedded catalog; no weights loaded)");
        Row("blocks", $"{layers} of {spec.NumHiddenLayers} (targets {string.Join(",", targets)})");
        Row("LoRA", $"{plan.TrainableParameters.ToString("N0", CultureInfo.InvariantCulture)} trainable (PEFT's count)");
        Row("lengths", $"CB {lengths.Request}+{lengths.Response}, retain {lengths.Retain}; batch {batch}; dtype {(s.IsBf16 ? "bf16" : "fp32")}");
        Row("memory plan", TrainMemoryPlan.Describe(memory));
        Consoles.Out.Write(grid);
        if (!memory.Fits)
            throw new UserInputException($"this run would not fit: {memory.Verdict} (train itself offers --batch-size, the lengths and --bf16; the other changes are for moelora plan)");
        return ExitCodes.Ok;
    }

    static string BuildLoraJson(TrainSettings s, TrainPreset preset, string? modelDir, int layers)
    {
        JsonObject o;
        if (s.LoraConfig is not null)
        {
            var file = LoraSettings.LoraConfigPath(s.LoraConfig);
            if (!File.Exists(file)) throw new FileNotFoundException($"--lora-config {file} does not exist.");
            o = Core.Util.UserJson.ParseObject(File.ReadAllText(file), $"--lora-config {s.LoraConfig}");
        }
        else o = JsonNode.Parse(preset.AdapterConfigJson(modelDir is null ? null : Path.GetFullPath(modelDir), Enumerable.Range(0, layers).ToList()))!.AsObject();
        static JsonArray Arr(string[] v) => new(LoraSettings.Split(v).Select(x => (JsonNode)x).ToArray());
        if (s.Rank is { } r) { o["r"] = r; if (s.LoraAlpha is null) o["lora_alpha"] = 2 * r; }
        if (s.LoraAlpha is { } a) o["lora_alpha"] = a;
        if (s.LoraDropout is { } d) o["lora_dropout"] = d;
        if (s.TargetModules is { } tm) o["target_modules"] = LoraSettings.TargetModulesJson(tm);
        if (s.TargetParameters is { } tp) o["target_parameters"] = tp is ["none"] ? null : Arr(tp);
        if (s.LayersToTransform is { } lt) o["layers_to_transform"] = new JsonArray(LoraSettings.ParseInts([lt], "--layers-to-transform").Select(x => (JsonNode)x).ToArray());
        else o["layers_to_transform"] ??= new JsonArray(Enumerable.Range(0, layers).Select(x => (JsonNode)x).ToArray());
        if (s.InitLoraWeights is { } iw) o["init_lora_weights"] = iw switch { "true" => true, "false" => false, "gaussian" => "gaussian", _ => throw new UserInputException("--init-lora-weights: use true, false or gaussian.") };
        return o.ToJsonString();
    }
}
