using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Tests.Support;

namespace MoeLora.Core.Tests;

/// <summary>
/// The head rule: a config builds the class its <c>architectures</c> names when the family knows it, else what
/// AutoModelForCausalLM builds (the oracle's class for configs without <c>architectures</c>), else image-text-to-text.
/// </summary>
public class HeadClassTests
{
    private static readonly Lazy<JsonObject> Models = new(() => OracleData.ReadGz("oracle-moe/moe_tiny_models.json.gz")["models"]!.AsObject());

    private static ModelSpec Build(string type, string? architecture)
    {
        var config = Models.Value[type]!["input_config"]!.DeepClone().AsObject();
        config["architectures"] = architecture is null ? null : new JsonArray(architecture);
        return ArchitectureRegistry.Build(new ModelConfig(config), Layout.V5);
    }

    [Theory]
    [InlineData("llama4", null, "Llama4ForCausalLM", "llama4_text", "model.layers")]
    [InlineData("llama4", "Llama4ForCausalLM", "Llama4ForCausalLM", "llama4_text", "model.layers")]
    [InlineData("llama4", "Llama4ForSequenceClassification", "Llama4ForCausalLM", "llama4_text", "model.layers")]
    [InlineData("llama4", "Llama4ForConditionalGeneration", "Llama4ForConditionalGeneration", "llama4", "language_model.model.layers")]
    [InlineData("qwen3_5_moe", null, "Qwen3_5MoeForCausalLM", "qwen3_5_moe_text", "model.layers")]
    [InlineData("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe", "model.language_model.layers")]
    [InlineData("qwen3_vl_moe", "Qwen3VLMoeForCausalLM", "Qwen3VLMoeForConditionalGeneration", "qwen3_vl_moe", "model.language_model.layers")]
    public void Architectures_picks_the_head(string type, string? architecture, string expectedClass, string expectedType, string layers)
    {
        var spec = Build(type, architecture);
        Assert.Equal(expectedClass, spec.Architecture);
        Assert.Equal(expectedType, spec.ModelType);
        Assert.Equal(layers, spec.DecoderLayersPath);
        Assert.NotNull(spec.Tree.Find(spec.DecoderLayersPath + ".0"));
        Assert.NotNull(spec.Tree.Find(spec.InputEmbeddings));
        Assert.NotNull(spec.Tree.Find(spec.OutputEmbeddings));
    }

    /// <summary>
    /// Qwen3_5MoeForConditionalGeneration (no oracle entry of its own): the language model is the oracle's
    /// Qwen3_5MoeForCausalLM under model.language_model, and the vision tower is the oracle's Qwen3-VL-MoE tower (same
    /// vision config) without the deepstack mergers.
    /// </summary>
    [Fact]
    public void Qwen3_5_moe_multimodal_is_the_causal_lm_plus_the_qwen3_vl_tower()
    {
        var spec = Build("qwen3_5_moe", "Qwen3_5MoeForConditionalGeneration");
        var causal = Models.Value["qwen3_5_moe"]!["params"]!.AsArray()
            .Select(p => $"{p![0]!.GetValue<string>()} {string.Join(",", OracleData.Shape(p[1]!))}")
            .Select(s => s.StartsWith("model.", StringComparison.Ordinal) ? "model.language_model." + s["model.".Length..] : s);
        var vision = Models.Value["qwen3_vl_moe"]!["params"]!.AsArray()
            .Select(p => $"{p![0]!.GetValue<string>()} {string.Join(",", OracleData.Shape(p[1]!))}")
            .Where(s => s.StartsWith("model.visual.", StringComparison.Ordinal) && !s.Contains("deepstack", StringComparison.Ordinal));
        var expected = vision.Concat(causal.Where(s => s.StartsWith("model.", StringComparison.Ordinal)))
            .Concat(causal.Where(s => !s.StartsWith("model.", StringComparison.Ordinal)));
        Assert.Equal(expected, spec.Tree.Parameters.Select(p => $"{p.Name} {string.Join(",", p.Shape)}"));
        var visionClasses = Models.Value["qwen3_vl_moe"]!["modules"]!.AsArray()
            .Where(m => m![0]!.GetValue<string>().StartsWith("model.visual", StringComparison.Ordinal) && !m[0]!.GetValue<string>().Contains("deepstack", StringComparison.Ordinal))
            .Select(m => $"{m![0]} {m[1]!.GetValue<string>().Replace("Qwen3VLMoe", "Qwen3_5Moe", StringComparison.Ordinal)}");
        Assert.Equal(visionClasses, spec.Tree.Modules.Where(m => m.Name.StartsWith("model.visual", StringComparison.Ordinal)).Select(m => $"{m.Name} {m.ClassName}"));
    }
}
