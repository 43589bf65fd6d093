using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Catalog;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;
using MoeLora.Core.Tests.Support;

namespace MoeLora.Core.Tests;

/// <summary>Golden tests: every LoRA variant in the oracle, planned from the catalog config, equals peft 0.21.</summary>
public class PeftOracleTests
{
    public static TheoryData<string, int> SeedVariants()
    {
        var data = new TheoryData<string, int>();
        foreach (var key in OracleData.ModelKeys())
        {
            var n = OracleData.ReadGz($"oracle/{key}.json.gz")["lora"]!.AsArray().Count;
            for (var i = 0; i < n; i++) data.Add(key, i);
        }
        return data;
    }

    public static TheoryData<string, string> ExtraVariants()
    {
        var data = new TheoryData<string, string>();
        foreach (var (model, variants) in OracleData.ReadGz("oracle/peft_variants.json.gz"))
            foreach (var (name, _) in variants!.AsObject()) data.Add(model, name);
        return data;
    }

    private static ModelSpec Spec(string key)
    {
        Assert.True(ModelCatalog.TryGetConfigJson(OracleData.HubId(key), out var json));
        return ArchitectureRegistry.Build(ModelConfig.Parse(json, key), Layout.V5);
    }

    [Theory]
    [MemberData(nameof(SeedVariants))]
    public void Oracle_lora_variant_matches(string key, int index)
    {
        var entry = OracleData.ReadGz($"oracle/{key}.json.gz")["lora"]![index]!.AsObject();
        var kwargs = entry["kwargs"]!.DeepClone().AsObject();
        kwargs["r"] = 16;
        kwargs["lora_alpha"] = 32;
        var plan = AdapterPlanner.Plan(Spec(key), LoraConfig.FromJson(kwargs, "kwargs"));

        Assert.Equal(entry["trainable"]!.GetValue<long>(), plan.TrainableParameters);
        Assert.Equal(entry["total"]!.GetValue<long>(), plan.AllParameters);
        AssertWrapped(entry["wrapped"]!.AsArray(), plan);
        var expected = entry["lora_param_shapes"]!.AsObject().Select(kv => $"{kv.Key} {Shape(kv.Value!)}").ToList();
        var actual = plan.Targets.SelectMany(t => t.Tensors).Select(t => $"{t.RuntimeName} {string.Join(",", t.Shape)}").ToList();
        Assert.Equal(expected.Order(StringComparer.Ordinal), actual.Order(StringComparer.Ordinal));
    }

    [Theory]
    [MemberData(nameof(ExtraVariants))]
    public void Oracle_extra_variant_matches(string key, string variant)
    {
        var entry = OracleData.ReadGz("oracle/peft_variants.json.gz")[key]![variant]!.AsObject();
        var config = LoraConfig.FromJson(entry["kwargs"]!.AsObject(), variant);
        if (entry["error"] is { } error)
        {
            var ex = Assert.ThrowsAny<PeftConfigException>(() => AdapterPlanner.Plan(Spec(key), config));
            var expectedType = error.GetValue<string>().Split('(')[0];
            Assert.Equal(expectedType, (ex as PeftInjectionException)?.PeftErrorType);
            return;
        }
        var plan = AdapterPlanner.Plan(Spec(key), config);
        Assert.Equal(entry["trainable"]!.GetValue<long>(), plan.TrainableParameters);
        Assert.Equal(entry["total"]!.GetValue<long>(), plan.AllParameters);
        AssertWrapped(entry["wrapped"]!.AsArray(), plan);
        var expected = entry["trainable_shapes"]!.AsObject().Select(kv => $"{kv.Key} {Shape(kv.Value!)}").ToList();
        var actual = plan.TrainableTensors.Select(t => $"{t.RuntimeName} {string.Join(",", t.Shape)}").ToList();
        Assert.Equal(expected, actual);
    }

    private static string Shape(JsonNode n) => string.Join(",", OracleData.Shape(n));

    private static void AssertWrapped(JsonArray wrapped, AdapterPlan plan)
    {
        var expected = wrapped.Select(w => w!.GetValue<string>()).Order(StringComparer.Ordinal).ToList();
        var actual = plan.Targets.Select(t => "base_model.model." + t.WrapperPath).Distinct().Order(StringComparer.Ordinal).ToList();
        Assert.Equal(expected, actual);
    }
}
