namespace MoeLora.Core.Peft;

/// <summary>A LoraConfig that PEFT itself would reject before touching the model (LoraConfig.__post_init__).</summary>
public class PeftConfigException(string message) : Exception(message);

/// <summary>
/// An error PEFT raises while injecting adapters (<c>ValueError</c>, <c>NoMatchingPeftModuleError</c>, ...);
/// <see cref="PeftErrorType"/> names the Python exception.
/// </summary>
public sealed class PeftInjectionException(string peftErrorType, string message) : PeftConfigException(message)
{
    public string PeftErrorType { get; } = peftErrorType;
}
