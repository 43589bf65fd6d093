namespace MoeLora.Core.Modules;

/// <summary>Where a module sits in the network, as the report groups adapters.</summary>
public enum ModuleLocation
{
    Other,
    Embedding,
    Attention,
    /// <summary>The feed-forward block of a dense (non-MoE) layer.</summary>
    Mlp,
    SharedExpert,
    RoutedExpert,
    Router,
    Norm,
    LmHead,
    Vision,
    Projector,
}

/// <summary>What PEFT sees when it looks at a module's type.</summary>
public enum ModuleKind
{
    /// <summary>Parameter-less or structural modules: model wrappers, layers, ModuleList, activations, rotary.</summary>
    Container,
    /// <summary>An <c>nn.Linear</c> (or subclass such as Llama4Router): PEFT wraps it with <c>lora.Linear</c>.</summary>
    Linear,
    /// <summary><c>nn.Embedding</c>: PEFT wraps it with <c>lora.Embedding</c>.</summary>
    Embedding,
    /// <summary><c>nn.Conv1d/2d/3d</c> (weight [out, in, *kernel]): PEFT wraps it with <c>lora.Conv1d/2d/3d</c>.</summary>
    Conv,
    /// <summary>RMSNorm / LayerNorm.</summary>
    Norm,
    /// <summary>A fused experts module holding 3-D parameters (reachable only through <c>target_parameters</c>).</summary>
    Experts,
    /// <summary>A router that is not an <c>nn.Linear</c> (transformers-5 TopK routers).</summary>
    Router,
    /// <summary>Any other module with parameters that PEFT cannot wrap.</summary>
    Other,
}

public static class ModuleLocationNames
{
    /// <summary>The snake_case name used in JSON and tables.</summary>
    public static string Name(this ModuleLocation location) => location switch
    {
        ModuleLocation.SharedExpert => "shared_expert",
        ModuleLocation.RoutedExpert => "routed_expert",
        ModuleLocation.LmHead => "lm_head",
        _ => location.ToString().ToLowerInvariant(),
    };

    public static string Label(this ModuleLocation location) => location switch
    {
        ModuleLocation.SharedExpert => "shared expert",
        ModuleLocation.RoutedExpert => "routed expert",
        ModuleLocation.LmHead => "lm_head",
        ModuleLocation.Mlp => "dense MLP",
        _ => location.ToString().ToLowerInvariant(),
    };
}
