namespace MoeLora.Cli.Infrastructure;

/// <summary>Process exit codes of every moelora command.</summary>
public static class ExitCodes
{
    public const int Ok = 0;

    /// <summary>Bad input or an analysis PEFT would refuse (unknown model, malformed config, nothing matched...).</summary>
    public const int Error = 1;

    /// <summary>The command line itself is wrong (unknown option, missing value).</summary>
    public const int Usage = 2;

    /// <summary>A bug in moelora (sysexits' EX_SOFTWARE).</summary>
    public const int Internal = 70;

    /// <summary>Interrupted (Ctrl-C).</summary>
    public const int Interrupted = 130;
}
