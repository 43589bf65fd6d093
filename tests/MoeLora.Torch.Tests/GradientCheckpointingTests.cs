using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// <see cref="CausalLm.GradientCheckpointing"/> recomputes each layer in backward: the loss, the outputs and every
/// adapter's gradient equal an ordinary step's on the same weights, across layer kinds (GQA attention with routed experts,
/// MLA, sinks, chunked attention, a DSA indexer whose selection later layers reuse, hyper-connection streams, Gated
/// DeltaNet and Mamba mixers).
/// </summary>
[Collection(TorchGlobalRng.Name)]
public class GradientCheckpointingTests
{
    public GradientCheckpointingTests() => TorchRuntime.EnsureInitialized();

    static string Config(string fixture) =>
        File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "Data", fixture, "model", "config.json"));

    const string AllAdapters = """{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}""";

    static (Tensor Logits, Dictionary<string, Tensor> Grads, int RouterLogits) Step(string config, bool checkpointed, string lora)
    {
        using var h = new DisposableModel(TorchModelFactory.Random(config, 11));
        h.Model.GradientCheckpointing = checkpointed;
        var adapters = RuntimeChecks.InjectWithNonZeroB(h.Model, lora);
        h.Model.Train();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var o = h.Model.Forward(ids, mask);
        (o.Logits * mask.unsqueeze(-1)).pow(2).mean().backward();
        return (o.Logits.detach().clone(), adapters.ToDictionary(p => p.Name, p => p.Param.grad is { } g ? g.detach().clone() : zeros_like(p.Param)),
            o.RouterLogits.Count);
    }

    [Theory]
    [InlineData("hf-tiny/qwen3_moe")]
    [InlineData("hf-tiny/deepseek_v3")]
    [InlineData("hf-tiny/gpt_oss")]
    [InlineData("hf-tiny/llama")]
    [InlineData("hf-moe/llama4_text_chunked")]
    [InlineData("hf-moe/glm_moe_dsa_sparse")]
    [InlineData("hf-moe/hy_v4")]
    [InlineData("hf-moe/qwen3_next")]
    [InlineData("hf-moe/jamba")]
    public void Gradients_equal_an_ordinary_step(string fixture)
    {
        var config = Config(fixture);
        var lora = fixture.Contains("llama", StringComparison.Ordinal) && !fixture.Contains("llama4", StringComparison.Ordinal)
            ? """{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}""" : AllAdapters;
        var before = Interlocked.Read(ref CheckpointedLayer.Recomputes);
        var plain = Step(config, false, lora);
        Assert.Equal(before, Interlocked.Read(ref CheckpointedLayer.Recomputes));
        var ckpt = Step(config, true, lora);
        // Every layer ran again in backward (all of them hold adapters).
        Assert.Equal(before + TorchModelFactory.Spec(config).NumHiddenLayers, Interlocked.Read(ref CheckpointedLayer.Recomputes));
        Assert.Equal(plain.RouterLogits, ckpt.RouterLogits);
        Assert.True(ckpt.Logits.allclose(plain.Logits, rtol: 1e-5, atol: 1e-6), $"{fixture}: logits differ");
        Assert.Equal(plain.Grads.Keys, ckpt.Grads.Keys);
        RuntimeChecks.AssertGradients(ckpt.Grads, name => plain.Grads[name].abs().sum().item<float>() == 0);
        foreach (var (name, g) in plain.Grads)
            Assert.True(ckpt.Grads[name].allclose(g, rtol: 1e-4, atol: 1e-6),
                $"{fixture} {name}: differs by {(ckpt.Grads[name] - g).abs().max().item<float>():E2}");
    }

    [Fact]
    public void Lora_dropout_is_refused_in_training_and_allowed_in_eval()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config("hf-tiny/qwen3_moe"), 11));
        h.Model.GradientCheckpointing = true;
        RuntimeChecks.InjectWithNonZeroB(h.Model, """{"r": 4, "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj"]}""");
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        h.Model.Train();
        var e = Assert.Throws<NotSupportedException>(() => h.Model.Forward(ids, mask));
        Assert.Contains("lora_dropout", e.Message, StringComparison.Ordinal);
        h.Model.Eval();
        using var o = h.Model.Forward(ids, mask);
        Assert.Equal(ids.shape[1], o.Logits.shape[1]);
    }

    [Fact]
    public void A_router_state_handed_between_layers_is_refused()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config("hf-moe/zaya"), 11));
        h.Model.GradientCheckpointing = true;
        RuntimeChecks.InjectWithNonZeroB(h.Model, """{"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}""");
        h.Model.Train();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        var e = Assert.Throws<NotSupportedException>(() => h.Model.Forward(ids, mask));
        Assert.Contains("router state", e.Message, StringComparison.Ordinal);
    }
}
