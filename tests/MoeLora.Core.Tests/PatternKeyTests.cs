using CsCheck;
using MoeLora.Core.Peft;

namespace MoeLora.Core.Tests;

/// <summary>
/// rank_pattern/alpha_pattern lookup (<c>get_pattern_key</c>): plain keys are matched without the regex engine; the
/// answer must be the regex's, <c>re.match(r"(.*\.)?(" + key + r")$", name)</c>, for every key and module name.
/// </summary>
public class PatternKeyTests
{
    private static bool ByRegex(string pattern, string key) => PyRegex.MatchesAnchoredAtEnd("(.*\\.)?(" + pattern + ")$", key);

    [Theory]
    [InlineData("experts.gate_up_proj", "model.layers.3.mlp.experts.gate_up_proj", true)]
    [InlineData("experts.gate_up_proj", "model.layers.3.mlp.expertsXgate_up_proj", true)] // '.' is a regex wildcard
    [InlineData("gate_up_proj", "model.layers.3.mlp.experts.gate_up_proj", true)]
    [InlineData("up_proj", "model.layers.3.mlp.experts.gate_up_proj", false)] // not dot-bounded
    [InlineData("q_proj", "q_proj", true)]
    [InlineData("layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj", false)]
    [InlineData("q_proj", "model.q_proj.lora", false)]
    [InlineData("q_proj|v_proj", "model.v_proj", true)] // not plain: the regex decides
    public void Plain_and_regex_keys_match_as_PEFT_matches_them(string pattern, string key, bool expected)
    {
        Assert.Equal(expected, ByRegex(pattern, key));
        Assert.Equal(expected, TargetMatcher.PatternValue([new KeyValuePair<string, int>(pattern, 7)], key) is not null);
    }

    [Fact]
    public void Every_plain_key_gives_the_regex_answer()
    {
        var part = Gen.OneOf(Gen.Const("."), Gen.Const("_"), Gen.Const("q"), Gen.Const("proj"), Gen.Const("1"), Gen.Const("up"), Gen.Const("experts"));
        var text = part.Array[0, 6].Select(p => string.Concat(p));
        Gen.Select(text.Where(p => p.Length > 0), text, Gen.Bool).Sample((pattern, name, suffix) =>
        {
            // Half the names end with the pattern (with its dots replaced), so matches are as common as misses.
            var key = suffix ? name + pattern.Replace('.', 'x') : name;
            return (TargetMatcher.PatternValue([new KeyValuePair<string, int>(pattern, 1)], key) is not null) == ByRegex(pattern, key);
        }, iter: 20_000);
    }
}
