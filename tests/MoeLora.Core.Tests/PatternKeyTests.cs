using CsCheck;
using MoeLora.Core.Peft;

namespace MoeLora.Core.Tests;

/// <summary>
/// rank_pattern/alpha_pattern lookup (<c>get_pattern_key</c>): plain keys (with "\." and a leading ".*" too) are matched without the regex engine; the
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
    [InlineData(".*\\.gate_up_proj", "model.layers.3.mlp.experts.gate_up_proj", true)] // PEFT's MoE conversion key
    [InlineData(".*\\.gate_up_proj", "model.layers.3.mlp.experts_gate_up_proj", false)] // "\\." is a literal dot
    [InlineData(".*\\.gate_up_proj", ".gate_up_proj", true)]
    [InlineData(".*gate_up_proj", "model.layers.3.mlp.experts.xgate_up_proj", true)] // ".*" needs no dot boundary
    [InlineData("experts\\.gate_up_proj", "model.layers.3.mlp.experts.gate_up_proj", true)]
    [InlineData("experts\\.gate_up_proj", "model.layers.3.mlp.expertsXgate_up_proj", false)]
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
        // Patterns also take escaped dots ("\\.") and a leading ".*", as PEFT's MoE conversion writes them.
        var patternPart = Gen.OneOf(part, Gen.Const("\\."));
        var pattern = Gen.Select(Gen.Bool, patternPart.Array[0, 6]).Select((any, p) => (any ? ".*" : "") + string.Concat(p));
        Gen.Select(pattern.Where(p => p.Length > 0), text, Gen.Int[0, 2]).Sample((pattern, name, suffix) =>
        {
            // Most names end with the pattern (its wildcards or its escaped dots made letters or dots), so matches
            // are as common as misses.
            var body = pattern.StartsWith(".*", StringComparison.Ordinal) ? pattern[2..] : pattern;
            var key = suffix switch
            {
                0 => name,
                1 => name + body.Replace("\\.", ".", StringComparison.Ordinal).Replace('.', 'x'),
                _ => name + body.Replace("\\.", ".", StringComparison.Ordinal),
            };
            return (TargetMatcher.PatternValue([new KeyValuePair<string, int>(pattern, 1)], key) is not null) == ByRegex(pattern, key);
        }, iter: 20_000);
    }
}
