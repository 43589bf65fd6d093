using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Torch.IO;
using MoeLora.Torch.Models;
using Xunit.Abstractions;

namespace MoeLora.Torch.Tests;

/// <summary>
/// Parity with transformers 5.17 for rope scalings beyond default/yarn (llama3 as in Llama 3.1 and Llama 4, linear),
/// tied embeddings (small Qwen models) and Mistral's sliding window. References made by tools/rope_check/make_rope_fixtures.py.
/// </summary>
public class RopeAndTyingParityTests(ITestOutputHelper log)
{
    private static string Dir(string name) => Path.Combine(AppContext.BaseDirectory, "Data", "rope_fixtures", name);

    [Theory]
    [InlineData("llama_rope_llama3")]
    [InlineData("llama_rope_linear")]
    [InlineData("qwen2_tied")]
    [InlineData("mistral_sliding")] // sliding_window 8 over 24 tokens
    public void Logits_and_hidden_states_match_transformers(string name)
    {
        var reference = Safetensors.Load(Path.Combine(Dir(name), "reference.safetensors"));
        using var holder = new DisposableModel(TorchModelFactory.Load(Path.Combine(Dir(name), "model")));
        var mask = reference["attention_mask"];
        using var output = holder.Model.Forward(reference["input_ids"], mask, outputHiddenStates: true);
        var err = Fixtures.MaskedRelError(output.Logits, reference["logits"], mask);
        log.WriteLine($"{name} logits: {err:E2}");
        Assert.True(err <= 1e-5, $"{name}: logits differ by {err:E2}");
        for (var i = 0; i < output.HiddenStates.Count; i++)
            Assert.True(Fixtures.MaskedRelError(output.HiddenStates[i], reference["hidden_states"][i], mask) <= 1e-5, $"{name}: hidden_states[{i}]");
    }

    [Fact]
    public void Tied_lm_head_is_the_embedding_and_listed_once()
    {
        using var holder = new DisposableModel(TorchModelFactory.Load(Path.Combine(Dir("qwen2_tied"), "model")));
        var names = holder.Model.NamedParameters().Select(p => p.Name).ToList();
        Assert.DoesNotContain("lm_head.weight", names);
        // The runtime's named_parameters equal Core's tree for the same config (tied weight once, as transformers).
        var config = File.ReadAllText(Path.Combine(Dir("qwen2_tied"), "model", "config.json"));
        var spec = ArchitectureRegistry.Build(MoeLora.Core.Config.ModelConfig.Parse(config, "qwen2_tied"), Layout.V5);
        Assert.Equal(spec.Tree.Parameters.Select(p => p.Name), names);
    }
}
