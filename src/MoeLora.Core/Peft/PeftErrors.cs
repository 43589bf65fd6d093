namespace MoeLora.Core.Peft;

/// <summary>A LoraConfig that PEFT itself would reject before touching the model (LoraConfig.__post_init__).</summary>
public class PeftConfigException(string message) : UserInputException(message);

/// <summary>
/// An error PEFT raises while injecting adapters (<c>ValueError</c>, <c>NoMatchingPeftModuleError</c>, ...);
/// <see cref="PeftErrorType"/> names the Python exception.
/// </summary>
public sealed class PeftInjectionException(string peftErrorType, string message) : PeftConfigException(message)
{
    public string PeftErrorType { get; } = peftErrorType;

    /// <summary>MoeLora's own advice, kept apart from PEFT's wording (e.g. which names this model offers).</summary>
    public string? Hint { get; private init; }

    public override string Message => Hint is null ? base.Message : $"{base.Message} Hint: {Hint}.";

    /// <summary>PEFT's message with MoeLora's advice attached.</summary>
    public PeftInjectionException WithHint(string hint) => new(PeftErrorType, base.Message) { Hint = hint };
}
