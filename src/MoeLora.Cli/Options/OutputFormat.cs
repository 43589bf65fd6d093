namespace MoeLora.Cli.Options;

/// <summary>What <c>--format</c> asks for: every command that prints a result writes text, json and markdown; report also html.</summary>
public enum OutputFormat
{
    Text,
    Json,
    Markdown,
    Html,
}

public sealed class OutputFormatConverter : ChoiceConverter<OutputFormat>
{
    public static readonly IReadOnlyList<(string Word, OutputFormat Value)> All =
        [("text", OutputFormat.Text), ("json", OutputFormat.Json), ("markdown", OutputFormat.Markdown), ("md", OutputFormat.Markdown), ("html", OutputFormat.Html)];

    protected override IReadOnlyList<(string Word, OutputFormat Value)> Words => All;
}

public static class OutputFormats
{
    /// <summary>The words for the formats a command writes, as its errors list them.</summary>
    public static string Accepted(IReadOnlyCollection<OutputFormat> formats) =>
        "use " + Choices.List(OutputFormatConverter.All.Where(w => formats.Contains(w.Value)).Select(w => w.Word));
}
