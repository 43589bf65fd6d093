using MoeLora.Core.Architectures;
using MoeLora.Core.Catalog;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Tests.Support;

namespace MoeLora.Core.Tests;

/// <summary>Golden tests: the v5 tree built from the catalog config equals transformers 5.17's named_modules/named_parameters.</summary>
public class ModuleTreeOracleTests
{
    public static TheoryData<string> Models() => new(OracleData.ModelKeys());

    private static (ModelSpec Spec, System.Text.Json.Nodes.JsonObject Oracle) Load(string key)
    {
        var oracle = OracleData.ReadGz($"oracle/{key}.json.gz");
        Assert.True(ModelCatalog.TryGetConfigJson(OracleData.HubId(key), out var json));
        var spec = ArchitectureRegistry.Build(ModelConfig.Parse(json, key), Layout.V5);
        return (spec, oracle);
    }

    [Theory]
    [MemberData(nameof(Models))]
    public void Modules_match_named_modules(string key)
    {
        var (spec, oracle) = Load(key);
        var expected = oracle["modules"]!.AsArray().Select(m => $"{m![0]} {m[1]}").ToList();
        var actual = spec.Tree.Modules.Select(m => $"{m.Name} {m.ClassName}").ToList();
        AssertSameSequence(expected, actual);
        Assert.Equal(oracle["class"]!.GetValue<string>(), spec.Architecture);
    }

    [Theory]
    [MemberData(nameof(Models))]
    public void Parameters_match_named_parameters(string key)
    {
        var (spec, oracle) = Load(key);
        var expected = oracle["params"]!.AsArray().Select(p => $"{p![0]} {string.Join(",", OracleData.Shape(p[1]!))}").ToList();
        var actual = spec.Tree.Parameters.Select(p => $"{p.Name} {string.Join(",", p.Shape)}").ToList();
        AssertSameSequence(expected, actual);
        Assert.Equal(oracle["num_params"]!.GetValue<long>(), spec.Tree.NumParameters);
    }

    /// <summary>Reports the first differing line rather than two huge lists.</summary>
    internal static void AssertSameSequence(IReadOnlyList<string> expected, IReadOnlyList<string> actual)
    {
        for (var i = 0; i < Math.Min(expected.Count, actual.Count); i++)
        {
            if (expected[i] != actual[i])
                Assert.Fail($"entry {i}: expected '{expected[i]}' but got '{actual[i]}'");
        }
        Assert.Equal(expected.Count, actual.Count);
    }
}
