using MoeLora.Cli.Commands;
using MoeLora.Cli.Infrastructure;
using MoeLora.Core;
using Spectre.Console.Cli;

namespace MoeLora.Cli;

public static class Program
{
    /// <summary>Every command, in the order --help lists them.</summary>
    private static readonly (string Name, Action<IConfigurator> Add)[] Commands =
    [
        ("report", c => c.AddCommand<ReportCommand>("report")
            .WithDescription("Config-only analysis: what LoRA target_modules/target_parameters match, adapter counts, memory, warnings")
            .WithExample("report", "mistralai/Mixtral-8x7B-v0.1", "--format", "json")),
        ("modules", c => c.AddCommand<ModulesCommand>("modules").WithDescription("named_modules() and named_parameters() as transformers builds the model")),
        ("plan", c => c.AddCommand<PlanCommand>("plan").WithDescription("Training-memory verdict plus accelerate_config.yaml, deepspeed_config.json, adapter_config.json, moelora_plan.json and a runnable train.py written to -o DIR")),
        ("diff", c => c.AddCommand<DiffCommand>("diff").WithDescription("Two models (or two LoraConfigs) side by side: targets, adapters, experts, hidden states, memory, gradient flow")),
        ("hidden-states", c => c.AddCommand<HiddenStatesCommand>("hidden-states").WithDescription("Run the model and write hidden_states [[layers, batch, seq, hidden]] and logits to a safetensors file")),
        ("routers", c => c.AddCommand<RoutersCommand>("routers").WithDescription("Router expert selection per layer for harmful vs benign prompts: frequencies, Jensen-Shannon divergence, heatmap PNG and JSON")),
        ("download", c => c.AddCommand<DownloadCommand>("download").WithDescription("Fetch a Hub model's config, tokenizer and safetensors weights into the HF cache (as huggingface_hub stores them)")),
        ("models", c => c.AddCommand<ModelsCommand>("models").WithDescription("List the embedded catalog of real configs")),
        ("train", c => c.AddCommand<TrainCommand>("train").WithDescription("Circuit-breaker (representation rerouting) LoRA training")),
        ("eval", c => c.AddCommand<EvalCommand>("eval").WithDescription("Rerouting and retain metrics with and without an adapter")),
        ("adapter", c => c.AddBranch("adapter", adapter =>
        {
            adapter.SetDescription("Inspect a PEFT LoRA adapter (layout, expert coverage, traps) or convert its expert layout");
            adapter.AddCommand<AdapterInspectCommand>("inspect").WithDescription("What the adapter adapts, its PEFT layout, ranks, scalings and known traps");
            adapter.AddCommand<AdapterConvertCommand>("convert").WithDescription("Exact re-layout: peft-v5 fused, per-expert, vllm or sglang");
        })),
        ("merge", c => c.AddCommand<MergeCommand>("merge").WithDescription("Fold a LoRA adapter into the weights (W+ΔW) and write the checkpoint in its Hub layout")),
    ];

    // Spectre.Console.Cli builds commands and their settings by reflection. The Native-AOT publish keeps this assembly and
    // Spectre.Console.Cli whole (TrimmerRootAssembly in the project file), so every type it reflects over is there; the
    // AOT build's output is checked against the JIT build's for the analysis and the runtime commands (BENCHMARKS.md).
    [System.Diagnostics.CodeAnalysis.UnconditionalSuppressMessage("AOT", "IL3050", Justification = "Command and settings types are rooted for Native AOT; see above.")]
    public static int Main(string[] args)
    {
        StartupTrace.Mark("main");
        if (args is ["--version"] or ["-V"])
        {
            Consoles.VerbatimOut.Write(VersionText());
            return ExitCodes.Ok;
        }
        var app = new CommandApp();
        app.Configure(config =>
        {
            config.SetApplicationName("moelora");
            config.PropagateExceptions();
            config.UseStrictParsing();
            // Spectre builds its model of every registered command (reflection over each settings class) on every
            // run; a run that names its command registers only that one, which keeps start-up short. Help of the
            // whole tool (no command, or a misspelt one) registers them all.
            var named = Commands.Where(c => args.Length > 0 && c.Name == args[0]).ToArray();
            foreach (var (_, add) in named.Length > 0 ? named : Commands) add(config);
        });
        return Run(app, args);
    }

    /// <summary>
    /// `moelora --version`: the tool, the library versions it reproduces, and the TorchSharp/libtorch it would load.
    /// TorchSharp is named from its file next to the tool (and libtorch from its package folder name) without loading
    /// either: --version stays as fast as the analysis commands.
    /// </summary>
    internal static string VersionText()
    {
        var asm = typeof(Program).Assembly;
        var tool = asm.GetCustomAttributes(typeof(System.Reflection.AssemblyInformationalVersionAttribute), false)
            .OfType<System.Reflection.AssemblyInformationalVersionAttribute>().FirstOrDefault()?.InformationalVersion ?? asm.GetName().Version?.ToString() ?? "unknown";
        var text = new System.Text.StringBuilder();
        text.Append($"moelora {tool.Split('+')[0]}\n");
        text.Append($"reproduces transformers {Reproduced.Transformers}, PEFT {Reproduced.Peft}\n");
        var torchVersion = TorchSharpVersion()?.Split('+')[0];
        text.Append(torchVersion is null ? "runtime: TorchSharp not found next to the tool (analysis commands only)\n"
            : $"runtime: TorchSharp {torchVersion} (loaded only by --load-model, train, eval, hidden-states, routers and merge)\n");
        return text.ToString();
    }

    /// <summary>
    /// The TorchSharp version: compiled into the tool in a Native-AOT build (no dynamic code), else the TorchSharp.dll
    /// next to the tool, read from its file so the JIT build does not load it; null when it is not there.
    /// </summary>
    private static string? TorchSharpVersion()
    {
        if (!System.Runtime.CompilerServices.RuntimeFeature.IsDynamicCodeSupported) return CompiledInTorchSharpVersion();
        var torchSharp = Path.Combine(AppContext.BaseDirectory, "TorchSharp.dll");
        return File.Exists(torchSharp) ? System.Diagnostics.FileVersionInfo.GetVersionInfo(torchSharp).ProductVersion : null;
    }

    // A method of its own: the JIT resolves the TorchSharp type (and loads its assembly) only if this one is compiled.
    [System.Runtime.CompilerServices.MethodImpl(System.Runtime.CompilerServices.MethodImplOptions.NoInlining)]
    private static string? CompiledInTorchSharpVersion() =>
        typeof(TorchSharp.torch).Assembly.GetCustomAttributes(typeof(System.Reflection.AssemblyInformationalVersionAttribute), false)
            .OfType<System.Reflection.AssemblyInformationalVersionAttribute>().FirstOrDefault()?.InformationalVersion;

    /// <summary>Runs the app and turns every failure into one line on stderr and a non-zero exit code.</summary>
    public static int Run(ICommandApp app, string[] args)
    {
        if (MissingOptionValue.Find(args) is { } missing)
        {
            Consoles.Error.WriteLine($"moelora: error: {missing}");
            return ExitCodes.Usage;
        }
        try
        {
            return app.Run(args);
        }
        catch (Exception e) when (OutOfMemory.Is(Unwrap(e)))
        {
            Consoles.Error.WriteLine($"moelora: error: out of device memory: {OneLine(OutOfMemory.Summary(Unwrap(e)))} " +
                "(try a smaller batch or sequence, fewer layers, or a GPU with more memory; `moelora plan` predicts the peak)");
            return ExitCodes.Error;
        }
        catch (Exception e) when (Classify(e) is { } code)
        {
            Consoles.Error.WriteLine($"moelora: error: {OneLine(UserMessage(e, args))}");
            return code;
        }
        catch (Exception e)
        {
            // A bug, not bad input: still one line (the stack trace only when asked for), so scripts and users get a
            // clear message and a distinct exit code.
            var inner = Unwrap(e);
            Consoles.Error.WriteLine($"moelora: internal error: {inner.GetType().Name}: {OneLine(inner.Message)} (set MOELORA_DEBUG=1 for the stack trace; please report it)");
            if (Environment.GetEnvironmentVariable("MOELORA_DEBUG") == "1") Consoles.Error.WriteLine(inner);
            return ExitCodes.Internal;
        }
    }

    private static Exception Unwrap(Exception e) =>
        e is AggregateException { InnerExceptions.Count: 1 } a ? Unwrap(a.InnerExceptions[0])
        : e is System.Reflection.TargetInvocationException { InnerException: { } inner } ? Unwrap(inner) : e;

    // Only input the user can fix is exit 1 or 2: MoeLora's own user-error type (config, PEFT and model-source errors
    // derive from it), the file system refusing something, and a data file that is not what it claims to be. Every
    // other exception (ArgumentException, InvalidOperationException, NullReferenceException...) is a bug: exit 70.
    private static int? Classify(Exception e) => Unwrap(e) switch
    {
        CommandParseException or CommandRuntimeException or UsageException => ExitCodes.Usage,
        UserInputException or IOException or UnauthorizedAccessException or InvalidDataException
            or NotSupportedException or Torch.Runtime.DeviceUnavailableException => ExitCodes.Error,
        OperationCanceledException => ExitCodes.Interrupted,
        _ => null,
    };

    /// <summary>
    /// Spectre reports a value it cannot convert as "Failed to convert 'abc' to Nullable`1" (a .NET type name). Say it
    /// in the user's terms instead: the option as typed, the value, and what it must be.
    /// </summary>
    internal static string UserMessage(Exception e, IReadOnlyList<string> args)
    {
        var message = Unwrap(e).Message;
        if (Unwrap(e) is not CommandRuntimeException { InnerException: var inner }) return message;
        if (inner is Options.OptionValueException bad)
            return $"{OptionGiven(args, bad.Value) ?? "a value"} '{bad.Value}': {bad.Expected}";
        var m = System.Text.RegularExpressions.Regex.Match(message, @"^Failed to convert '(?<value>.*)' to (?<type>[^.]+)\.?$", System.Text.RegularExpressions.RegexOptions.Singleline);
        if (!m.Success) return message;
        var value = m.Groups["value"].Value;
        var option = OptionGiven(args, value);
        var wanted = (inner?.Message ?? "") switch
        {
            var t when t.Contains("Int32", StringComparison.Ordinal) || t.Contains("Int64", StringComparison.Ordinal) => "an integer",
            var t when t.Contains("Double", StringComparison.Ordinal) || t.Contains("Single", StringComparison.Ordinal) => "a number",
            var t when t.Contains("Boolean", StringComparison.Ordinal) => "true or false",
            _ => "a valid value",
        };
        return option is null ? $"'{value}' is not {wanted}" : $"{option} '{value}': not {wanted}";
    }

    /// <summary>The option as the user typed it before <paramref name="value"/> (--x v or --x=v), or null.</summary>
    private static string? OptionGiven(IReadOnlyList<string> args, string value)
    {
        for (int i = 0; i < args.Count; i++)
        {
            if (args[i].Trim() == value.Trim() && i > 0 && args[i - 1].StartsWith('-')) return args[i - 1];
            if (args[i].StartsWith('-') && args[i].EndsWith("=" + value, StringComparison.Ordinal)) return args[i][..args[i].IndexOf('=')];
        }
        return null;
    }

    private static string OneLine(string message) =>
        string.Join(' ', message.Split(['\r', '\n'], StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries));
}
