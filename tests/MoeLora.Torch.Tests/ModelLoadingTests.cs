using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

public class ModelLoadingTests
{
    public ModelLoadingTests() => TorchRuntime.EnsureInitialized();

    static string Config(string type) => File.ReadAllText(Path.Combine(Fixtures.Dir(type), "model", "config.json"));

    [Theory]
    [MemberData(nameof(ParityTests.Models), MemberType = typeof(ParityTests))]
    public void SeededRandomInitHasTheLoadedNamesAndShapesAndIsReproducible(string type)
    {
        using var loaded = new DisposableModel(TorchModelFactory.Load(Path.Combine(Fixtures.Dir(type), "model")));
        using var a = new DisposableModel(TorchModelFactory.Random(Config(type), seed: 7));
        using var b = new DisposableModel(TorchModelFactory.Random(Config(type), seed: 7));
        var names = loaded.Model.StateDict().Select(s => (s.Name, string.Join(",", s.Value.shape))).ToList();
        Assert.Equal(names, a.Model.StateDict().Select(s => (s.Name, string.Join(",", s.Value.shape))).ToList());
        foreach (var ((_, x), (_, y)) in a.Model.StateDict().Zip(b.Model.StateDict()))
            Assert.True(x.bytes.SequenceEqual(y.bytes));
        using var _ = no_grad();
        using var o = a.Model.Forward(ones(1, 4, ScalarType.Int64));
        Assert.False(o.Logits.isnan().any().item<bool>());
    }

    [Fact]
    public void RuntimeNamesAreTransformersV5Names()
    {
        using var m = new DisposableModel(TorchModelFactory.Load(Path.Combine(Fixtures.Dir("mixtral"), "model")));
        var names = m.Model.NamedParameters().Select(p => p.Name).ToList();
        Assert.Equal("model.embed_tokens.weight", names[0]);
        Assert.Equal("lm_head.weight", names[^1]);
        Assert.Contains("model.layers.0.mlp.gate.weight", names);
        Assert.Contains("model.layers.2.mlp.experts.gate_up_proj", names);
        var gu = m.Model.NamedParameters().First(p => p.Name == "model.layers.0.mlp.experts.gate_up_proj").Param;
        Assert.Equal(new long[] { 4, 128, 32 }, gu.shape);
        // DeepSeek's correction bias is a persistent buffer: in the state dict, not a parameter.
        using var ds = new DisposableModel(TorchModelFactory.Load(Path.Combine(Fixtures.Dir("deepseek_v3"), "model")));
        Assert.Contains(ds.Model.StateDict(), s => s.Name == "model.layers.1.mlp.gate.e_score_correction_bias");
        Assert.DoesNotContain(ds.Model.NamedParameters(), p => p.Name.EndsWith("e_score_correction_bias"));
    }

    [Fact]
    public void BadInputsFailClearlyBeforeHeavyWork()
    {
        var dir = Path.Combine(Path.GetTempPath(), $"moelora-bad-{Guid.NewGuid():N}");
        Directory.CreateDirectory(dir);
        try
        {
            File.WriteAllText(Path.Combine(dir, "config.json"), Config("llama"));
            Assert.Throws<FileNotFoundException>(() => TorchModelFactory.Load(dir));
            File.WriteAllText(Path.Combine(dir, "model.safetensors.index.json"),
                """{"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}""");
            var e = Assert.Throws<FileNotFoundException>(() => TorchModelFactory.Load(dir));
            Assert.Contains("model-00001-of-00002.safetensors", e.Message);
            File.Delete(Path.Combine(dir, "model.safetensors.index.json"));
            File.Copy(Path.Combine(Fixtures.Dir("qwen3"), "model", "model.safetensors"), Path.Combine(dir, "model.safetensors"));
            var mismatch = Assert.Throws<InvalidDataException>(() => TorchModelFactory.Load(dir));
            Assert.Contains("q_norm", mismatch.Message);
            Assert.Throws<MoeLora.Core.Config.ConfigException>(() => TorchModelFactory.Random("""{"model_type": "bert"}""", 0));
            var refusal = Assert.Throws<NotSupportedException>(() => TorchModelFactory.Random("""{"model_type": "doge", "is_moe": true, "num_hidden_layers": 2}""", 0));
            Assert.Contains("Doge with is_moe does not run", refusal.Message);
            Assert.Throws<MoeLora.Core.UserInputException>(() => TorchModelFactory.Random(Config("llama"), 0, ScalarType.Int32));
        }
        finally { Directory.Delete(dir, true); }
    }

    [Fact]
    public void LoadsInBFloat16()
    {
        using var m = new DisposableModel(TorchModelFactory.Load(Path.Combine(Fixtures.Dir("qwen3_moe"), "model"), ScalarType.BFloat16));
        var reference = Fixtures.Reference("qwen3_moe");
        using var _ = no_grad();
        using var o = m.Model.Forward(reference["input_ids"], reference["attention_mask"]);
        Assert.Equal(ScalarType.BFloat16, o.Logits.dtype);
        Assert.True(Fixtures.MaskedRelError(o.Logits, reference["logits"], reference["attention_mask"]) < 5e-2);
    }

    [Theory]
    [InlineData("qwen3_moe", "seed_targets")]
    [InlineData("gpt_oss", "attn_plus_experts")]
    [InlineData("qwen2_moe", "seed_targets")]
    public void MeasuredTrainableCountEqualsPeftsCount(string type, string variant)
    {
        using var m = new DisposableModel(TorchModelFactory.Load(Path.Combine(Fixtures.Dir(type), "model")));
        LoraInjector.LoadPeftAdapter(m.Model, Path.Combine(Fixtures.Dir(type), variant));
        var fixture = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.Dir(type), "fixture.json")))!;
        long expected = fixture["variants"]![variant]!["trainable"]!.GetValue<long>();
        Assert.Equal(expected, Measurements.CountParameters(m.Model).Trainable);
        Assert.Empty(Measurements.FindSharedStorage(Measurements.AdapterTensors(m.Model)));
    }
}
