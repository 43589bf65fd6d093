using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;
using MoeLora.Core.Tests.Support;

namespace MoeLora.Core.Tests;

/// <summary>
/// Golden tests against Data/oracle-moe (tools/oracle/discover_moe.py, transformers 5.17 + peft 0.21): every config
/// class of transformers 5.17 whose default config has experts, shrunk to a tiny valid config, built as
/// AutoModelForCausalLM (or AutoModelForImageTextToText where a type has no causal-LM head), with its module tree, the
/// keys save_pretrained writes, and ~55 LoRA variants each.
/// </summary>
public class MoeTypesOracleTests
{
    private static readonly Lazy<JsonObject> Models = new(() => OracleData.ReadGz("oracle-moe/moe_tiny_models.json.gz")["models"]!.AsObject());
    private static readonly Lazy<JsonObject> Peft = new(() => OracleData.ReadGz("oracle-moe/moe_tiny_peft.json.gz")["models"]!.AsObject());

    /// <summary>
    /// Types transformers 5.17 builds as a causal or image-text-to-text LM that MoeLora does not analyse yet, with the
    /// reason. The coverage test fails when a type is neither supported nor listed here, and when a listed type becomes
    /// supported (so this list only ever shrinks).
    /// </summary>
    internal static readonly IReadOnlyDictionary<string, string> NotYetCovered = new Dictionary<string, string>(StringComparer.Ordinal)
    {
    };

    /// <summary>Supported types whose entry here is not yet reproduced, with the reason (excluded from the golden tests).</summary>
    internal static readonly IReadOnlyDictionary<string, string> NotYetReproduced = new Dictionary<string, string>(StringComparer.Ordinal)
    {
    };

    private static IEnumerable<string> BuiltTypes() =>
        Models.Value.Where(kv => kv.Value!["error"] is null).Select(kv => kv.Key);

    private static IEnumerable<string> Covered() =>
        BuiltTypes().Where(t => !NotYetCovered.ContainsKey(t) && !NotYetReproduced.ContainsKey(t));

    public static TheoryData<string> CoveredTypes() => new(Covered());

    public static TheoryData<string, string> PeftCases()
    {
        var data = new TheoryData<string, string>();
        foreach (var type in Covered())
            foreach (var (variant, _) in Peft.Value[type]!.AsObject()) data.Add(type, variant);
        return data;
    }

    [Fact]
    public void Every_moe_type_is_supported_or_listed()
    {
        var missing = BuiltTypes().Where(t => !ArchitectureRegistry.IsSupported(t) && !NotYetCovered.ContainsKey(t)).ToList();
        Assert.True(missing.Count == 0, "MoE types neither supported nor listed in NotYetCovered: " + string.Join(", ", missing));
        var stale = NotYetCovered.Keys.Where(ArchitectureRegistry.IsSupported).ToList();
        Assert.True(stale.Count == 0, "Supported now, remove from NotYetCovered: " + string.Join(", ", stale));
    }

    /// <summary>
    /// A family says its tree is unchecked (ModelSpec.Unchecked, the report's tree_unchecked warning) exactly when the
    /// oracle holds no built entry for its type: oracle data for a type makes the flag stale (this fails until it is
    /// removed), and a supported type without oracle data must carry it.
    /// </summary>
    [Fact]
    public void Unchecked_exactly_when_the_oracle_has_no_entry()
    {
        var built = BuiltTypes().ToHashSet(StringComparer.Ordinal);
        var oracled = built.Concat(ExtraOracleTests.OracleTypes()).ToHashSet(StringComparer.Ordinal);
        foreach (var type in ArchitectureRegistry.SupportedModelTypes)
        {
            ModelSpec spec;
            try { spec = ArchitectureRegistry.Build(ModelConfig.Parse($$"""{"model_type": "{{type}}"}""", "config.json"), Layout.V5); }
            catch (ConfigException) { continue; }  // a default config the family refuses (see Default_config_builds)
            if (oracled.Contains(type)) Assert.True(spec.Unchecked is null, $"{type} has oracle data: remove its Unchecked note");
            else Assert.True(spec.Unchecked is not null, $"{type} has no oracle data: its family must set Unchecked");
        }
    }

    /// <summary>
    /// Qwen3-Omni (thinker, talker and code2wav) has no causal-LM or image-text-to-text class in transformers 5.17 (the
    /// oracle records that error): it is refused with what it is and what to analyse instead, not with the list of
    /// supported types.
    /// </summary>
    [Fact]
    public void Omni_model_without_a_language_model_class_says_what_to_load()
    {
        Assert.Contains("no causal-LM or image-text-to-text head", Models.Value["qwen3_omni_moe"]!["error"]!.GetValue<string>(), StringComparison.Ordinal);
        var e = Assert.Throws<ConfigException>(() => ArchitectureRegistry.Build(ModelConfig.Parse("""{"model_type": "qwen3_omni_moe"}""", "config.json"), Layout.V5));
        Assert.DoesNotContain("supported model types", e.Message, StringComparison.Ordinal);
        Assert.Contains("thinker_config", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [MemberData(nameof(CoveredTypes))]
    public void Tree_matches(string type) => ExtraOracleTests.AssertTree(Models.Value[type]!.AsObject());

    /// <summary>The persistent buffers a family declares are transformers' own, with their shapes.</summary>
    [Theory]
    [MemberData(nameof(CoveredTypes))]
    public void Declared_buffers_are_persistent_buffers(string type)
    {
        var entry = Models.Value[type]!.AsObject();
        var persistent = entry["buffers"]?.AsArray().Where(b => b![2]?.GetValue<bool>() ?? true)
            .Select(b => $"{b![0]} {string.Join(",", OracleData.Shape(b[1]!))}").ToHashSet() ?? [];
        var declared = ExtraOracleTests.Build(entry).Tree.Buffers.Select(b => $"{b.Name} {string.Join(",", b.Shape)}").ToList();
        Assert.All(declared, d => Assert.Contains(d, persistent));
    }

    /// <summary>transformers' own to_dict() output (every default written out) builds the same tree.</summary>
    [Theory]
    [MemberData(nameof(CoveredTypes))]
    public void Tree_from_to_dict_matches(string type)
    {
        var entry = Models.Value[type]!.AsObject().DeepClone().AsObject();
        entry["input_config"] = entry["config"]!.DeepClone();
        ExtraOracleTests.AssertTree(entry);
    }

    /// <summary>Types whose config class defaults leave a size unset (None), so a config naming only model_type is refused
    /// (deepseek_ocr2: text_config.mlp_layer_types, which transformers indexes per layer).</summary>
    // qwen4_exp: the indexer_* fields default to None and every attention layer builds a QSA indexer from them.
    private static readonly HashSet<string> DefaultConfigIncomplete = new(StringComparer.Ordinal)
        { "deepseek_ocr2", "dots1", "hunyuan_v1_moe", "lfm2_moe", "qwen4_exp", "qwen4_exp_text" };

    /// <summary>
    /// The type's own defaults (a config naming only model_type, as transformers' default config) build in both layouts:
    /// the rules hold beyond the oracle's tiny sizes. Types whose defaults are incomplete are refused with one line.
    /// </summary>
    [Theory]
    [MemberData(nameof(CoveredTypes))]
    public void Default_config_builds(string type)
    {
        foreach (var layout in new[] { Layout.V5, Layout.V4 })
        {
            var config = new ModelConfig(new JsonObject { ["model_type"] = type });
            if (DefaultConfigIncomplete.Contains(type))
            {
                Assert.Throws<ConfigException>(() => ArchitectureRegistry.Build(config, layout));
                continue;
            }
            Assert.True(ArchitectureRegistry.Build(config, layout).Tree.NumParameters > 0);
        }
    }

    /// <summary>The checkpoint layout (what save_pretrained writes, legacy names where transformers converts) is the
    /// v4 tree's parameters plus persistent buffers.</summary>
    [Theory]
    [MemberData(nameof(CoveredTypes))]
    public void Checkpoint_layout_is_what_save_pretrained_writes(string type) =>
        AssertCheckpointLayout(Models.Value[type]!.AsObject(), type);

    internal static void AssertCheckpointLayout(JsonObject entry, string type)
    {
        var spec = ArchitectureRegistry.Build(new ModelConfig(entry["input_config"]!.DeepClone().AsObject()), Layout.V4);
        var buffers = entry["buffers"]?.AsArray().Where(b => b![2]?.GetValue<bool>() ?? true)
            .Select(b => b![0]!.GetValue<string>()).ToHashSet() ?? [];
        // The conversion mapping may rename a buffer's module path on save (MiniMax-M2: mlp.e_score_correction_bias →
        // block_sparse_moe.e_score_correction_bias), so a saved key is a buffer when its leaf is a persistent buffer's
        // leaf that no parameter has.
        var parameterLeaves = entry["params"]!.AsArray().Select(p => Leaf(p![0]!.GetValue<string>())).ToHashSet();
        var bufferLeaves = buffers.Select(Leaf).Where(l => !parameterLeaves.Contains(l)).ToHashSet();
        // Buffers the checkpoint renames are not under their runtime names: a family may declare them (then they must
        // be saved exactly there); an undeclared one is recognised by its leaf.
        var renamedBuffers = spec.Tree.Buffers.Where(b => !buffers.Contains(b.Name)).ToList();
        var declared = renamedBuffers.Select(b => b.Name).ToHashSet();
        var expected = entry["saved"]!.AsArray().Select(k => $"{k![0]} {string.Join(",", OracleData.Shape(k[1]!))}")
            .Where(e => !buffers.Contains(e.Split(' ')[0])
                        && (declared.Contains(e.Split(' ')[0]) || !bufferLeaves.Contains(Leaf(e.Split(' ')[0]))));
        expected = SavedLayoutOracleTests.WithoutDocumentedV4Differences(type, expected);
        Assert.Equal(expected.Order(StringComparer.Ordinal),
            spec.Tree.Parameters.Concat(renamedBuffers).Select(p => $"{p.Name} {string.Join(",", p.Shape)}").Order(StringComparer.Ordinal));
    }

    private static string Leaf(string name) => name[(name.LastIndexOf('.') + 1)..];

    [Theory]
    [MemberData(nameof(PeftCases))]
    public void Peft_variant_matches(string type, string variant) =>
        AssertPeftVariant(Models.Value[type]!.AsObject(), Peft.Value[type]![variant]!.AsObject(), variant);

    internal static void AssertPeftVariant(JsonObject model, JsonObject entry, string variant)
    {
        if (entry["skipped"] is not null) return; // the generator found nothing to test for this model
        var spec = ExtraOracleTests.Build(model);
        LoraConfig config;
        try
        {
            config = LoraConfig.FromJson(entry["kwargs"]!.DeepClone().AsObject(), variant);
        }
        catch (PeftConfigException) when (entry["error"] is not null)
        {
            return; // PEFT rejected the config before touching the model, and so do we.
        }
        if (entry["error"] is { } error)
        {
            var ex = Assert.ThrowsAny<PeftConfigException>(() => AdapterPlanner.Plan(spec, config));
            var errorType = error.GetValue<string>().Split(':')[0].Split('(')[0];
            if (ex is PeftInjectionException inj) Assert.Equal(errorType, inj.PeftErrorType);
            return;
        }
        var plan = AdapterPlanner.Plan(spec, config);
        Assert.Equal(entry["trainable"]!.GetValue<long>(), plan.TrainableParameters);
        Assert.Equal(entry["total"]!.GetValue<long>(), plan.AllParameters);
        ExtraOracleTests.AssertWrapped(entry, plan);
        Assert.Equal(
            entry["trainable_shapes"]!.AsArray().Select(t => $"{t![0]} {string.Join(",", OracleData.Shape(t[1]!))}"),
            plan.TrainableTensors.Select(t => $"{t.RuntimeName} {string.Join(",", t.Shape)}"));
        Assert.Equal(
            entry["saved"]!.AsArray().Select(t => $"{t![0]} {string.Join(",", OracleData.Shape(t[1]!))}").Order(StringComparer.Ordinal),
            plan.SavedTensors.Select(t => $"{t.SavedKey} {string.Join(",", t.Shape)}").Order(StringComparer.Ordinal));
    }
}
