using MoeLora.Core.Architectures;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Peft;

/// <summary>How PEFT wraps a target.</summary>
public enum AdapterKind
{
    /// <summary><c>lora.Linear</c> around an nn.Linear: its own lora_A / lora_B modules.</summary>
    Linear,
    /// <summary><c>lora.Embedding</c>: lora_embedding_A / lora_embedding_B parameters.</summary>
    Embedding,
    /// <summary><c>lora.Conv1d/2d/3d</c>: lora_A a conv with the base kernel (in → r), lora_B a 1×…×1 conv (r → out).</summary>
    Conv,
    /// <summary><c>lora.ParamWrapper</c> on a bare nn.Parameter (target_parameters); 3-D experts get r per expert.</summary>
    Parameter,
}

/// <summary>One LoRA tensor: its name while the PeftModel runs and its key in adapter_model.safetensors.</summary>
/// <param name="RuntimeName">Name in <c>PeftModel.named_parameters()</c> (with <c>.default</c>).</param>
/// <param name="SavedKey">Key in adapter_model.safetensors, or null when PEFT does not save it.</param>
/// <param name="Trainable">False for an adapter tensor a LoRA variant keeps frozen (MiCA's lora_B): counted and saved, not trained.</param>
public sealed record AdapterTensor(string RuntimeName, string? SavedKey, long[] Shape, bool Trainable = true)
{
    public long NumElements => Util.Shapes.Product(Shape);
}

/// <summary>One adapter PEFT creates: a wrapped module, or a wrapped parameter of a module.</summary>
public sealed record AdapterTarget
{
    /// <summary>The module name, or <c>module.param</c> for a parameter target (the key rank/alpha patterns see).</summary>
    public required string Name { get; init; }

    public required string ModuleName { get; init; }

    public string? ParameterName { get; init; }

    public required AdapterKind Kind { get; init; }

    /// <summary>The class of the wrapped base module (<c>Linear</c>, <c>MixtralExperts</c>, ...).</summary>
    public required string BaseClass { get; init; }

    public required ModuleLocation Location { get; init; }

    public int? Layer { get; init; }

    public required int R { get; init; }

    public required double Alpha { get; init; }

    /// <summary>alpha / r, or alpha / sqrt(r) with rsLoRA.</summary>
    public required double Scaling { get; init; }

    public required long InFeatures { get; init; }

    public required long OutFeatures { get; init; }

    /// <summary>Experts sharing this adapter's A/B tensors (1 for Linear, Embedding and 2-D parameters).</summary>
    public required long NumExperts { get; init; }

    /// <summary>The base weight (or parameter) shape being adapted.</summary>
    public required long[] BaseShape { get; init; }

    /// <summary>The module path holding lora_A / lora_B (nested ParamWrappers add <c>.base_layer</c>).</summary>
    public required string WrapperPath { get; init; }

    public bool Dora { get; init; }

    /// <summary>True for the LM head adapter that PEFT ties to the embedding adapter (shared storage).</summary>
    public bool TiedToEmbedding { get; init; }

    public required IReadOnlyList<AdapterTensor> Tensors { get; init; }

    // Plain loops: the analysis sums these over every target several times per run (LINQ allocated each time).
    public long NumParameters
    {
        get
        {
            long n = 0;
            for (var i = 0; i < Tensors.Count; i++) n += Tensors[i].NumElements;
            return n;
        }
    }

    /// <summary>The part of <see cref="NumParameters"/> that trains (all of it unless a variant freezes a factor).</summary>
    public long NumTrainableParameters
    {
        get
        {
            long n = 0;
            for (var i = 0; i < Tensors.Count; i++) if (Tensors[i].Trainable) n += Tensors[i].NumElements;
            return n;
        }
    }

    /// <summary>Whether one adapter covers several experts as per-expert slices of fused A/B tensors.</summary>
    public bool IsPerExpertSlices => Kind == AdapterKind.Parameter && NumExperts > 1;
}

/// <summary>A base tensor made trainable besides the LoRA weights (bias modes, modules_to_save copies).</summary>
public sealed record TrainableExtra(string RuntimeName, string? SavedKey, long[] Shape, string Reason, bool CountsInTotal)
{
    public long NumElements => Util.Shapes.Product(Shape);
}

/// <summary>
/// The single source of what LoRA does to a model: every adapter PEFT would create, with PEFT's names, shapes and
/// counts. The report prints it, the memory model sizes it, the runtime injects it, the adapter writer names from it.
/// </summary>
public sealed class AdapterPlan
{
    public required ModelSpec Spec { get; init; }

    public required PeftVersion Version { get; init; }

    /// <summary>The configuration as the user wrote it.</summary>
    public required LoraConfig Requested { get; init; }

    /// <summary>The configuration after PEFT's own rewrites (MoE conversion, defaults, all-linear expansion).</summary>
    public required LoraConfig Effective { get; init; }

    public ConversionNote? Conversion { get; init; }

    public required IReadOnlyList<AdapterTarget> Targets { get; init; }

    public required IReadOnlyList<TrainableExtra> Extras { get; init; }

    /// <summary>PEFT's warnings (exclude_modules that excluded nothing, a target kind that matched nothing, ...).</summary>
    public required IReadOnlyList<string> PeftWarnings { get; init; }

    /// <summary>Every LoRA tensor's elements, frozen ones included (they are allocated and saved).</summary>
    public long LoraParameters
    {
        get
        {
            long n = 0;
            for (var i = 0; i < Targets.Count; i++) n += Targets[i].NumParameters;
            return n;
        }
    }

    public long ExtraTrainableParameters => Extras.Sum(e => e.NumElements);

    /// <summary><c>get_nb_trainable_parameters()[0]</c>.</summary>
    public long TrainableParameters
    {
        get
        {
            long n = ExtraTrainableParameters;
            for (var i = 0; i < Targets.Count; i++) n += Targets[i].NumTrainableParameters;
            return n;
        }
    }

    /// <summary><c>get_nb_trainable_parameters()[1]</c>: base parameters + adapters + modules_to_save copies.</summary>
    public long AllParameters => Spec.Tree.NumParameters + LoraParameters + Extras.Where(e => e.CountsInTotal).Sum(e => e.NumElements);

    /// <summary>Every trainable tensor in <c>PeftModel.named_parameters()</c> order.</summary>
    public required IReadOnlyList<AdapterTensor> TrainableTensors { get; init; }

    /// <summary>Every adapter tensor (trainable or frozen) in <c>named_parameters()</c> order; defaults to the trainable ones.</summary>
    public IReadOnlyList<AdapterTensor>? AdapterTensors { get; init; }

    /// <summary>What <c>save_pretrained</c> writes into adapter_model.safetensors (key → shape).</summary>
    public IReadOnlyList<AdapterTensor> SavedTensors => (AdapterTensors ?? TrainableTensors).Where(t => t.SavedKey is not null)
        .Concat(SavedOnly).GroupBy(t => t.SavedKey).Select(g => g.First()).ToList();

    /// <summary>Tensors saved though not trainable (bias="all" also saves bias buffers, e.g. e_score_correction_bias).</summary>
    public IReadOnlyList<AdapterTensor> SavedOnly { get; init; } = [];
}
