using MoeLora.Cli.Infrastructure;

namespace MoeLora.Cli.Tests;

public class MissingOptionValueTests
{
    [Fact]
    public void ValueTakingNamesAreNeverFlags()
    {
        // One set of value-taking names serves every command only while no name is a flag elsewhere.
        var valued = MissingOptionValue.ValueTakingOptions();
        var flags = MissingOptionValue.OptionAttributes().Where(a => a.ValueName is null)
            .SelectMany(a => a.LongNames.Select(n => "--" + n).Concat(a.ShortNames.Select(n => "-" + n)));
        Assert.DoesNotContain(flags, valued.Contains);
        Assert.Contains("--output", valued);
        Assert.Contains("-t", valued);
    }

    [Theory]
    [InlineData(null, "report", "Qwen/Qwen3-30B-A3B", "--rank", "8")]
    [InlineData(null, "report", "--layers-to-transform", "-1", "--format=json")]
    [InlineData(null, "train", "--load-model", "--preset", "tiny")]
    [InlineData("--format needs a value", "report", "--format")]
    [InlineData("-o needs a value", "plan", "-o", "--load-model")]
    [InlineData("--output needs a value", "report", "--output=")]
    [InlineData(null, "report", "--output=x.json")]
    public void FindsTheFirstOptionLeftWithoutItsValue(string? expected, params string[] args) =>
        Assert.Equal(expected, MissingOptionValue.Find(args));
}
