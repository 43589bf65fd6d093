namespace MoeLora.Core;

/// <summary>
/// Input the user can fix: a flag value, a file, a folder, a setting that contradicts another. The message is one
/// complete line in the user's terms (it names the option or the file) and is printed as is, with exit code 1.
/// Anything else that escapes a command is a bug in MoeLora (exit 70). Config and PEFT errors and every model-source
/// failure derive from this type.
/// </summary>
public class UserInputException : Exception
{
    public UserInputException(string message) : base(message) { }

    public UserInputException(string message, Exception inner) : base(message, inner) { }
}
