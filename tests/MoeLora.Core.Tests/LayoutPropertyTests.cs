using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Tests.Support;

namespace MoeLora.Core.Tests;

/// <summary>
/// Properties that tie the v4 (transformers 4.57) layout, which has no executed oracle, to the v5 layout, which does:
/// for every tiny oracle config the two trees hold the same number of parameters (fusing experts moves weights, it
/// does not add or drop any), and the v4 tree has per-expert nn.Linear modules exactly where 4.57 had them.
/// Each test method is self-contained (reads its own data) so others can add methods here.
/// </summary>
public partial class LayoutPropertyTests
{
    public static TheoryData<string> TinyConfigNames()
    {
        var models = OracleData.ReadGz("oracle-extra/tiny_models.json.gz")["models"]!.AsObject();
        return new(models.Where(kv => ArchitectureRegistry.IsSupported(ModelType(kv.Value!.AsObject()))).Select(kv => kv.Key));
    }

    private static string ModelType(JsonObject entry) => entry["input_config"]!["model_type"]!.GetValue<string>();

    private static (ModelSpec V4, ModelSpec V5) BuildBoth(string name)
    {
        var entry = OracleData.ReadGz("oracle-extra/tiny_models.json.gz")["models"]![name]!.AsObject();
        ModelSpec Build(Layout layout) =>
            ArchitectureRegistry.Build(new ModelConfig(entry["input_config"]!.DeepClone().AsObject()), layout);
        return (Build(Layout.V4), Build(Layout.V5));
    }

    [Theory]
    [MemberData(nameof(TinyConfigNames))]
    public void V4_and_v5_hold_the_same_number_of_parameters_except_documented_regressions(string name)
    {
        var (v4, v5) = BuildBoth(name);
        long expectedV4MinusV5 = 0;
        if (v5.ModelType == "phimoe")
        {
            // transformers 4.57 (PR #40132 rebuilt PhiMoE on Mixtral's classes): the decoder layer norms became
            // PhimoeRMSNorm (weight only, so each layer loses two [H] biases) and the lm_head lost its lm_head_bias.
            // transformers-moe-layouts §4.10; 5.x restored both.
            expectedV4MinusV5 -= 2 * v5.NumHiddenLayers * v5.HiddenSize;
            if (v5.Tree.Find("lm_head")!.Parameter("bias") is not null) expectedV4MinusV5 -= v5.VocabSize;
        }
        Assert.Equal(expectedV4MinusV5, v4.Tree.NumParameters - v5.Tree.NumParameters);
    }

    /// <summary>Model types whose 4.57 experts were an nn.ModuleList of per-expert MLPs (three nn.Linear each).</summary>
    private static readonly HashSet<string> PerExpertIn457 =
    [
        "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe", "phimoe", "qwen3_next", "jamba",
    ];

    [GeneratedRegex(@"\.experts\.(\d+)\.[^.]+$")]
    private static partial Regex PerExpertLinear();

    [Theory]
    [MemberData(nameof(TinyConfigNames))]
    public void V4_has_per_expert_linears_exactly_where_4_57_had_them(string name)
    {
        var (v4, v5) = BuildBoth(name);
        var perExpert = v4.Tree.Modules
            .Where(m => m.Kind == ModuleKind.Linear && PerExpertLinear().IsMatch(m.Name))
            .ToList();
        if (PerExpertIn457.Contains(v4.ModelType))
        {
            Assert.DoesNotContain(v4.Tree.Modules, m => m.Kind == ModuleKind.Experts);
            // Per MoE layer: experts 0..E-1, each with gate/up/down (w1/w3/w2) as nn.Linear.
            foreach (var layer in v4.Moe.MoeLayers)
            {
                var prefix = $"{v4.DecoderLayersPath}.{layer}.";
                var byExpert = perExpert.Where(m => m.Name.StartsWith(prefix, StringComparison.Ordinal))
                    .GroupBy(m => int.Parse(PerExpertLinear().Match(m.Name).Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture))
                    .ToDictionary(g => g.Key, g => g.Count());
                Assert.Equal(Enumerable.Range(0, (int)v4.Moe.NumExperts), byExpert.Keys.Order());
                Assert.All(byExpert.Values, n => Assert.Equal(3, n));
            }
            Assert.Equal(3 * v4.Moe.NumExperts * v4.Moe.MoeLayers.Count, perExpert.Count);
            // v5 fuses them: no per-expert nn.Linear left.
            Assert.DoesNotContain(v5.Tree.Modules, m => m.Kind == ModuleKind.Linear && PerExpertLinear().IsMatch(m.Name));
        }
        else
        {
            // Dense models, and MoE models whose experts were already fused 3-D tensors in 4.57
            // (gpt_oss, llama4, granitemoe / granitemoeshared ParallelExperts).
            Assert.Empty(perExpert);
            if (v4.Moe.IsMoe) Assert.Contains(v4.Tree.Modules, m => m.Kind == ModuleKind.Experts);
        }
    }
}
