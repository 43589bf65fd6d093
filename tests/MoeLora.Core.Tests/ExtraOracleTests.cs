using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;
using MoeLora.Core.Tests.Support;

namespace MoeLora.Core.Tests;

/// <summary>
/// Golden tests against Data/oracle-extra (made with transformers 5.17 + peft 0.21 by tools/oracle/make_oracle.py):
/// tiny configs of every supported model type with ~40 LoraConfig variants each, and every catalog config's tree.
/// </summary>
public class ExtraOracleTests
{
    private static readonly Lazy<JsonObject> TinyModels = new(() => OracleData.ReadGz("oracle-extra/tiny_models.json.gz")["models"]!.AsObject());
    private static readonly Lazy<JsonObject> TinyPeft = new(() => OracleData.ReadGz("oracle-extra/tiny_peft.json.gz")["models"]!.AsObject());
    /// <summary>PEFT 0.21 LoraConfig options beyond the standard variants (MiCA, trainable tokens, fan_in_fan_out, PEFT's
    /// own validation errors), made with <c>make_oracle.py tiny --cpu --variants …</c> (real CPU weights: MiCA's SVD).</summary>
    private static readonly Lazy<JsonObject> TinyPeftOptions = new(() => OracleData.ReadGz("oracle-extra/tiny_peft_options.json.gz")["models"]!.AsObject());
    private static readonly Lazy<JsonObject> Catalog = new(() => OracleData.ReadGz("oracle-extra/catalog.json.gz")["models"]!.AsObject());

    public static TheoryData<string> TinyModelNames() => new(TinyModels.Value.Select(kv => kv.Key));

    /// <summary>The model types this oracle holds a tiny config of.</summary>
    public static IEnumerable<string> OracleTypes() =>
        TinyModels.Value.Select(kv => kv.Value?["input_config"]?["model_type"]?.GetValue<string>()).OfType<string>();

    public static TheoryData<string> CatalogTrees() =>
        new(Catalog.Value.Where(kv => kv.Value!["modules"] is not null).Select(kv => kv.Key));

    public static TheoryData<string, int> CatalogPeftCases()
    {
        var data = new TheoryData<string, int>();
        foreach (var (key, entry) in Catalog.Value)
        {
            var n = entry!["lora"]?.AsArray().Count ?? 0;
            for (var i = 0; i < n; i++) data.Add(key, i);
        }
        return data;
    }

    /// <summary>The full-size catalog models with PEFT's three standard variants (seed list, all-linear, attention + experts).</summary>
    [Theory]
    [MemberData(nameof(CatalogPeftCases))]
    public void Catalog_peft_variant_matches(string key, int index)
    {
        var model = Catalog.Value[key]!.AsObject();
        var entry = model["lora"]![index]!.AsObject();
        var spec = Build(model);
        var kwargs = entry["kwargs"]!.DeepClone().AsObject();
        if (entry["error"] is not null)
        {
            Assert.ThrowsAny<PeftConfigException>(() => AdapterPlanner.Plan(spec, LoraConfig.FromJson(kwargs, key)));
            return;
        }
        var plan = AdapterPlanner.Plan(spec, LoraConfig.FromJson(kwargs, key));
        Assert.Equal(entry["trainable"]!.GetValue<long>(), plan.TrainableParameters);
        Assert.Equal(entry["total"]!.GetValue<long>(), plan.AllParameters);
        AssertWrapped(entry, plan);
        Assert.Equal(
            entry["saved"]!.AsArray().Select(t => $"{t![0]} {string.Join(",", OracleData.Shape(t[1]!))}").Order(StringComparer.Ordinal),
            plan.SavedTensors.Select(t => $"{t.SavedKey} {string.Join(",", t.Shape)}").Order(StringComparer.Ordinal));
    }

    /// <summary>Every wrapped module, in PEFT's order, with the r, alpha and scaling PEFT gave it.</summary>
    internal static void AssertWrapped(JsonObject entry, AdapterPlan plan)
    {
        var wrapped = entry["wrapped"]!.AsArray().Select(w => w!.GetValue<string>()).ToList();
        Assert.Equal(wrapped.Order(StringComparer.Ordinal),
            plan.Targets.Select(t => "base_model.model." + t.WrapperPath).Distinct().Order(StringComparer.Ordinal));
        if (entry["wrapped_r_alpha_scaling"] is not JsonArray ras) return;
        var byWrapper = plan.Targets.ToDictionary(t => "base_model.model." + t.WrapperPath);
        for (var i = 0; i < wrapped.Count; i++)
        {
            var t = byWrapper[wrapped[i]];
            var expected = ras[i]!.AsArray();
            Assert.Equal(expected[0]!.GetValue<double>(), t.R);
            Assert.Equal(expected[1]!.GetValue<double>(), t.Alpha);
            Assert.Equal(expected[2]!.GetValue<double>(), t.Scaling, 9);
        }
    }

    public static TheoryData<string, string> PeftCases()
    {
        var data = new TheoryData<string, string>();
        foreach (var (model, variants) in TinyPeft.Value)
            foreach (var (variant, _) in variants!.AsObject()) data.Add(model, variant);
        return data;
    }

    public static TheoryData<string, string> PeftOptionCases()
    {
        var data = new TheoryData<string, string>();
        foreach (var (model, variants) in TinyPeftOptions.Value)
            foreach (var (variant, _) in variants!.AsObject()) data.Add(model, variant);
        return data;
    }

    [Theory]
    [MemberData(nameof(PeftOptionCases))]
    public void Tiny_peft_option_matches(string model, string variant) =>
        AssertTinyPeft(model, variant, TinyPeftOptions.Value[model]![variant]!.AsObject());

    internal static ModelSpec Build(JsonObject entry) =>
        ArchitectureRegistry.Build(new ModelConfig(entry["input_config"]!.DeepClone().AsObject()), Layout.V5);

    [Theory]
    [MemberData(nameof(TinyModelNames))]
    public void Tiny_tree_matches(string name) => AssertTree(TinyModels.Value[name]!.AsObject());

    /// <summary>transformers' own to_dict() output (defaults filled in, extras, nulls) builds the same tree.</summary>
    [Theory]
    [MemberData(nameof(TinyModelNames))]
    public void Tiny_tree_from_to_dict_matches(string name)
    {
        var entry = TinyModels.Value[name]!.AsObject().DeepClone().AsObject();
        entry["input_config"] = entry["config"]!.DeepClone();
        AssertTree(entry);
    }

    [Theory]
    [MemberData(nameof(CatalogTrees))]
    public void Catalog_tree_matches(string key) => AssertTree(Catalog.Value[key]!.AsObject());

    internal static void AssertTree(JsonObject entry)
    {
        var spec = Build(entry);
        Assert.Equal(entry["class"]!.GetValue<string>(), spec.Architecture);
        ModuleTreeOracleTests.AssertSameSequence(
            entry["modules"]!.AsArray().Select(m => $"{m![0]} {m[1]}").ToList(),
            spec.Tree.Modules.Select(m => $"{m.Name} {m.ClassName}").ToList());
        ModuleTreeOracleTests.AssertSameSequence(
            entry["params"]!.AsArray().Select(p => $"{p![0]} {string.Join(",", OracleData.Shape(p[1]!))}").ToList(),
            spec.Tree.Parameters.Select(p => $"{p.Name} {string.Join(",", p.Shape)}").ToList());
        Assert.Equal(entry["num_params"]!.GetValue<long>(), spec.Tree.NumParameters);
    }

    [Theory]
    [MemberData(nameof(PeftCases))]
    public void Tiny_peft_variant_matches(string model, string variant) =>
        AssertTinyPeft(model, variant, TinyPeft.Value[model]![variant]!.AsObject());

    private static void AssertTinyPeft(string model, string variant, JsonObject entry)
    {
        if (entry["skipped"] is not null) return; // the generator found nothing to test for this model
        var spec = Build(TinyModels.Value[model]!.AsObject());
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
            var type = error.GetValue<string>().Split(':')[0].Split('(')[0];
            if (ex is PeftInjectionException inj) Assert.Equal(type, inj.PeftErrorType);
            return;
        }
        var plan = AdapterPlanner.Plan(spec, config);
        Assert.Equal(entry["trainable"]!.GetValue<long>(), plan.TrainableParameters);
        Assert.Equal(entry["total"]!.GetValue<long>(), plan.AllParameters);
        AssertWrapped(entry, plan);
        Assert.Equal(
            entry["trainable_shapes"]!.AsArray().Select(t => $"{t![0]} {string.Join(",", OracleData.Shape(t[1]!))}"),
            plan.TrainableTensors.Select(t => $"{t.RuntimeName} {string.Join(",", t.Shape)}"));
        Assert.Equal(
            entry["saved"]!.AsArray().Select(t => $"{t![0]} {string.Join(",", OracleData.Shape(t[1]!))}").Order(StringComparer.Ordinal),
            plan.SavedTensors.Select(t => $"{t.SavedKey} {string.Join(",", t.Shape)}").Order(StringComparer.Ordinal));
    }
}
