using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Tests.Support;

namespace MoeLora.Core.Tests;

/// <summary>ZayaConfig.validate_architecture's refusals, each a one-line error here too.</summary>
public class ZayaConfigRulesTests
{
    private static ModelConfig Config(Action<JsonObject> edit) => new(OracleData.MoeTinyConfig("zaya", edit));

    [Theory]
    [InlineData("num_experts_per_tok", 2)]
    [InlineData("num_key_value_heads", 3)]
    public void An_unsupported_geometry_is_refused(string field, int value) =>
        Assert.Throws<ConfigException>(() => ArchitectureRegistry.Build(Config(c => c[field] = value), Layout.V5));

    [Fact]
    public void Sliding_layers_need_a_window()
    {
        var layers = new JsonArray("hybrid", "hybrid_sliding", "hybrid", "hybrid");
        Assert.Throws<ConfigException>(() => ArchitectureRegistry.Build(Config(c => c["layer_types"] = layers.DeepClone()), Layout.V5));
        var spec = ArchitectureRegistry.Build(Config(c =>
        {
            c["layer_types"] = layers.DeepClone();
            c["sliding_window"] = 32;
        }), Layout.V5);
        Assert.Equal(4, spec.Moe.MoeLayers.Count);
    }
}
