using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Torch.IO;
using MoeLora.Torch.Models;
using Xunit.Abstractions;

namespace MoeLora.Torch.Tests;

/// <summary>
/// Parity with transformers 5.17 for rope scalings beyond default/yarn (llama3 as in Llama 3.1 and Llama 4, linear,
/// longrope as in Phi-3.5-MoE with its own mscales, dynamic NTK with its state across forwards), tied embeddings (small Qwen models) and Mistral's sliding window. References made by tools/rope_check/make_rope_fixtures.py.
/// </summary>
public class RopeAndTyingParityTests(ITestOutputHelper log)
{
    private static string Dir(string name) => Path.Combine(AppContext.BaseDirectory, "Data", "rope_fixtures", name);

    // Every case tools/rope_check/make_rope_fixtures.py made and the repository holds (its CASES say what each checks):
    // llama3, linear, tied embeddings, Mistral's sliding window; where present, longrope and dynamic rope.
    static IEnumerable<string> CaseNames() =>
        Directory.GetDirectories(Path.Combine(AppContext.BaseDirectory, "Data", "rope_fixtures")).Select(Path.GetFileName)
            .OfType<string>().Order(StringComparer.Ordinal);

    public static TheoryData<string> Cases() => new(CaseNames());

    [Fact]
    public void The_cases_include_every_rope_type() =>
        // yarn is checked by the gpt_oss and mistral4 runtime fixtures.
        Assert.Superset(new HashSet<string> { "llama_rope_llama3", "llama_rope_linear", "qwen2_tied", "mistral_sliding",
            "llama_rope_longrope_long", "llama_rope_longrope_short", "llama_rope_dynamic", "phimoe_longrope_long", "phimoe_longrope_short" },
            CaseNames().ToHashSet());

    [Theory]
    [MemberData(nameof(Cases))]
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

        // A second forward of the same model on the first 20 tokens: a rope that keeps state (dynamic) must keep it
        // as transformers does.
        if (!reference.TryGetValue("logits_second", out var second)) return;
        var shortIds = reference["input_ids"].narrow(1, 0, 20);
        var shortMask = mask.narrow(1, 0, 20);
        using var again = holder.Model.Forward(shortIds, shortMask);
        var err2 = Fixtures.MaskedRelError(again.Logits, second, shortMask);
        log.WriteLine($"{name} second forward logits: {err2:E2}");
        Assert.True(err2 <= 1e-5, $"{name}: second forward's logits differ by {err2:E2}");
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
