using System.ComponentModel;
using MoeLora.Core.Analysis;
using MoeLora.Core.Memory;
using MoeLora.Core.Modules;

namespace MoeLora.Cli.Options;

/// <summary>
/// One definition per concept shared by several commands: its spelling (with the old spellings kept as aliases), its
/// help line with the default, and its typed parser. A settings class that needs the concept declares a property
/// with these constants and the matching converter; inheritance shares whole groups (<see cref="Commands.ResultSettings"/>,
/// <see cref="Commands.ModelSettings"/>, <see cref="Commands.LoraSettings"/>).
/// </summary>
public static class SharedOptions
{
    public const string Format = "--format <FORMAT>";
    public const string Output = "-o|--output <PATH>";

    public const string Device = "--device <DEVICE>";
    public const string DeviceHelp = "cpu or cuda[[:N]] (default cpu)";

    public const string Seed = "--seed <SEED>";

    /// <summary>The dtype the model's weights (and activations) are in. <c>--dtype</c> in the analysis commands.</summary>
    public const string ModelDType = "--model-dtype <DTYPE>";

    public const string GpuMemory = "--gpu-memory <SIZE>";
    public const string GpuMemoryHelp = "Memory of one GPU, e.g. 80GiB or 141GB (default 80GiB)";
}

/// <summary>A compute device as <c>--device</c> names it: cpu, cuda or cuda:N.</summary>
[TypeConverter(typeof(DeviceConverter))]
public readonly record struct DeviceName(string Text)
{
    public static readonly DeviceName Cpu = new("cpu");

    public override string ToString() => Text;
}

public sealed class DeviceConverter : ParsingConverter<DeviceName>
{
    protected override DeviceName Parse(string text)
    {
        var lower = text.ToLowerInvariant();
        if (lower is "cpu" or "cuda") return new DeviceName(lower);
        if (lower.StartsWith("cuda:", StringComparison.Ordinal) && int.TryParse(lower[5..], System.Globalization.NumberStyles.None, System.Globalization.CultureInfo.InvariantCulture, out _))
            return new DeviceName(lower);
        throw new OptionValueException(text, "use cpu, cuda or cuda:N");
    }
}

public sealed class DTypeConverter : ChoiceConverter<DType>
{
    protected override IReadOnlyList<(string Word, DType Value)> Words { get; } =
        [("fp32", DType.Float32), ("bf16", DType.BFloat16), ("fp16", DType.Float16),
         ("float32", DType.Float32), ("f32", DType.Float32), ("bfloat16", DType.BFloat16), ("float16", DType.Float16), ("f16", DType.Float16), ("half", DType.Float16)];

    protected override DType Parse(string text)
    {
        try { return base.Parse(text); }
        // Aliases are accepted but not advertised.
        catch (OptionValueException) { throw new OptionValueException(text, "unknown dtype: use fp32, bf16 or fp16"); }
    }
}

public sealed class LayoutConverter : ChoiceConverter<Layout>
{
    protected override IReadOnlyList<(string Word, Layout Value)> Words { get; } =
        [("v5", Layout.V5), ("v4", Layout.V4)];
}

public sealed class ShardingConverter : ChoiceConverter<Sharding>
{
    protected override IReadOnlyList<(string Word, Sharding Value)> Words { get; } =
        [("ddp", Sharding.Ddp), ("zero2", Sharding.Zero2), ("zero3", Sharding.Zero3), ("fsdp", Sharding.Fsdp), ("ep", Sharding.Ep)];

    protected override Sharding Parse(string text) =>
        // Core's parser knows the long aliases (zero-2, expert-parallel).
        Wrap(text, () => TrainingSetup.ParseSharding(text), () => base.Parse(text));

    internal static T Wrap<T>(string text, Func<T> core, Func<T> words)
    {
        try { return core(); }
        catch (Core.UserInputException) { return words(); }
    }
}

public sealed class QuantizationConverter : ChoiceConverter<Quantization>
{
    protected override IReadOnlyList<(string Word, Quantization Value)> Words { get; } =
        [("none", Quantization.None), ("int8", Quantization.Int8), ("nf4", Quantization.Nf4)];

    protected override Quantization Parse(string text) => ShardingConverter.Wrap(text, () => TrainingSetup.ParseQuantization(text), () => base.Parse(text));
}

public sealed class TrainingModeConverter : ChoiceConverter<TrainingMode>
{
    protected override IReadOnlyList<(string Word, TrainingMode Value)> Words { get; } =
        [("lora", TrainingMode.Lora), ("circuit-breaker", TrainingMode.CircuitBreaker)];

    protected override TrainingMode Parse(string text) => ShardingConverter.Wrap(text, () => TrainingSetup.ParseMode(text), () => base.Parse(text));
}

public sealed class AttentionConverter : ChoiceConverter<AttentionImpl>
{
    protected override IReadOnlyList<(string Word, AttentionImpl Value)> Words { get; } =
        [("sdpa", AttentionImpl.Sdpa), ("eager", AttentionImpl.Eager)];

    protected override AttentionImpl Parse(string text) => ShardingConverter.Wrap(text, () => TrainingSetup.ParseAttention(text), () => base.Parse(text));
}

/// <summary>A memory size as typed (80GiB, 141GB, 80 = GiB) and its bytes.</summary>
[TypeConverter(typeof(MemorySizeConverter))]
public readonly record struct MemorySize(string Text, long Bytes)
{
    public override string ToString() => Text;
}

public sealed class MemorySizeConverter : ParsingConverter<MemorySize>
{
    protected override MemorySize Parse(string text)
    {
        try { return new MemorySize(text, TrainingSetup.ParseBytes(text)); }
        catch (Core.UserInputException) { throw new OptionValueException(text, "not a size such as 80GiB or 141GB"); }
    }
}
