using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// LoRA's <c>lora_A</c> on a bf16 input: <see cref="CastLinear"/> gives PEFT's <c>linear(x.to(fp32), A)</c> and its
/// gradients, while autograd keeps the bf16 input itself rather than an fp32 copy (what that saves is measured on the
/// GPU: BENCHMARKS.md, `report --measure-steps`).
/// </summary>
[Collection(TorchGlobalRng.Name)]
public class CastLinearTests
{
    public CastLinearTests() => TorchRuntime.EnsureInitialized();

    static (Tensor Y, Tensor GradX, Tensor GradA) Run(bool cast, Tensor x0, Tensor a0, Tensor g)
    {
        var x = x0.detach().requires_grad_(true);
        var a = a0.detach().requires_grad_(true);
        var y = cast ? CastLinear.Apply(x, a) : nn.functional.linear(x.to(a.dtype), a);
        y.backward([g]);
        return (y.detach(), x.grad!, a.grad!);
    }

    [Theory]
    [InlineData(ScalarType.BFloat16)]
    [InlineData(ScalarType.Float16)]
    public void GivesTheCompositeOutputAndGradients(ScalarType narrow)
    {
        manual_seed(3);
        var x = randn(2, 5, 16).to(narrow);
        var a = randn(4, 16) * 0.1;
        var g = randn(2, 5, 4);
        var (y1, gx1, ga1) = Run(true, x, a, g);
        var (y2, gx2, ga2) = Run(false, x, a, g);
        Assert.Equal(narrow, gx1.dtype);
        Assert.Equal(ScalarType.Float32, ga1.dtype);
        Assert.True(y1.allclose(y2, rtol: 0, atol: 0), "forward differs");
        Assert.True(gx1.allclose(gx2, rtol: 0, atol: 0), "input gradient differs");
        Assert.True(ga1.allclose(ga2, rtol: 1e-6, atol: 1e-7), $"weight gradient differs by {(ga1 - ga2).abs().max().item<float>()}");
    }

    [Fact]
    public void A_bf16_model_gets_PEFTs_adapter_gradients()
    {
        // LoraLinear switches to CastLinear only for a narrower input: a bf16 model with fp32 adapters, as PEFT runs one.
        var config = File.ReadAllText(Path.Combine(Fixtures.Dir("qwen3_moe"), "model", "config.json"));
        const string lora = """{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "target_parameters": ["mlp.experts.gate_up_proj"]}""";
        Dictionary<string, Tensor> Grads(bool keepNarrow)
        {
            LoraLinear.KeepWideCopy = !keepNarrow;
            try
            {
                using var h = new DisposableModel(TorchModelFactory.Random(config, 5, ScalarType.BFloat16));
                var (_, grads) = RuntimeChecks.LoraStep(h.Model, lora);
                return grads.ToDictionary(g => g.Key, g => g.Value.detach().clone());
            }
            finally { LoraLinear.KeepWideCopy = false; }
        }
        var reference = Grads(false);
        var ours = Grads(true);
        Assert.Equal(reference.Keys.Order(), ours.Keys.Order());
        Assert.Contains(ours.Keys, k => k.Contains("q_proj.lora_A", StringComparison.Ordinal));
        RuntimeChecks.AssertGradients(ours);
        foreach (var (name, g) in reference)
            Assert.True(ours[name].allclose(g, rtol: 1e-5, atol: 1e-7), $"{name}: differs by {(ours[name] - g).abs().max().item<float>()}");
    }

    [Fact]
    public void RefusesAnInputAsWideAsTheWeight() =>
        Assert.Throws<ArgumentException>(() => CastLinear.Apply(randn(2, 4), randn(3, 4)));
}
