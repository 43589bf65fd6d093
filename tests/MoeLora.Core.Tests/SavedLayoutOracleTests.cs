using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Tests.Support;

namespace MoeLora.Core.Tests;

/// <summary>
/// transformers 5 saves checkpoints in the legacy (4.x) names by default (save_original_format=True): the keys it
/// wrote for every tiny config (Data/oracle-extra/tiny_saved_keys.json.gz, tools/oracle/make_saved_keys.py) must be
/// exactly the v4 tree's parameters plus persistent buffers, with the same shapes. This is the executed check of the
/// v4 layout's parameter names (module classes and order in v4 come from source reading).
/// </summary>
public class SavedLayoutOracleTests
{
    private static readonly Lazy<JsonObject> Saved = new(() => OracleData.ReadGz("oracle-extra/tiny_saved_keys.json.gz")["models"]!.AsObject());
    private static readonly Lazy<JsonObject> Tiny = new(() => OracleData.ReadGz("oracle-extra/tiny_models.json.gz")["models"]!.AsObject());

    public static TheoryData<string> Models() => new(Saved.Value.Select(kv => kv.Key));

    [Theory]
    [MemberData(nameof(Models))]
    public void V4_parameters_are_what_save_pretrained_writes(string name)
    {
        var saved = Saved.Value[name]!.AsObject();
        Assert.Null(saved["error"]);
        var spec = ArchitectureRegistry.Build(new ModelConfig(Tiny.Value[name]!["input_config"]!.DeepClone().AsObject()), Layout.V4);
        var expected = saved["saved"]!.AsArray().Select(k => $"{k![0]} {string.Join(",", OracleData.Shape(k[1]!))}").ToList();
        // Persistent buffers are saved but are no parameters (DeepSeek-V3's e_score_correction_bias).
        var buffers = Tiny.Value[name]!["buffers"]?.AsArray()
            .Where(b => b![2]?.GetValue<bool>() ?? true)
            .Select(b => b![0]!.GetValue<string>()).ToHashSet() ?? [];
        var actual = spec.Tree.Parameters.Select(p => $"{p.Name} {string.Join(",", p.Shape)}").ToList();
        var onDisk = expected.Where(e => !buffers.Contains(e.Split(' ')[0]));
        onDisk = WithoutDocumentedV4Differences(name, onDisk);
        Assert.Equal(onDisk.Order(StringComparer.Ordinal), actual.Order(StringComparer.Ordinal));
    }

    /// <summary>
    /// The one documented difference between 4.57's runtime and the on-disk format: #40132 made PhiMoE's decoder layer
    /// norms weight-only RMSNorms and dropped the lm_head bias, so those checkpoint keys are unexpected there.
    /// </summary>
    internal static IEnumerable<string> WithoutDocumentedV4Differences(string modelType, IEnumerable<string> onDisk) =>
        modelType != "phimoe" ? onDisk
        : onDisk.Where(e => !(e.StartsWith("lm_head.bias", StringComparison.Ordinal) ||
                              (e.Contains("layernorm.bias", StringComparison.Ordinal) && e.StartsWith("model.layers.", StringComparison.Ordinal))));
}
