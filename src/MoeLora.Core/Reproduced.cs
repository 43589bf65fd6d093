using MoeLora.Core.Peft;

namespace MoeLora.Core;

/// <summary>
/// The library versions whose behaviour MoeLora reproduces (the oracle data in the tests was made with them). One
/// place for `moelora --version` and anything else that names them.
/// </summary>
public static class Reproduced
{
    /// <summary>transformers release the v5 module layouts and defaults are checked against.</summary>
    public const string Transformers = "5.17";

    /// <summary>PEFT release whose LoRA rules are reproduced by default (<see cref="PeftVersion.Default"/>).</summary>
    public static string Peft => PeftVersion.Default.ToString();
}
