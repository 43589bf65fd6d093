using MoeLora.Core;

namespace MoeLora.Cli.Infrastructure;

/// <summary>
/// The command line itself is wrong: a required option is missing, a value is out of its range or not one of the
/// accepted words. Printed as one line, exit code 2 (as Spectre's own parse errors).
/// </summary>
public sealed class UsageException(string message) : UserInputException(message);
