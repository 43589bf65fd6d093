using MoeLora.Torch.IO;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Training;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests.Training;

/// <summary>
/// One circuit-breaker step against cb_reference.safetensors for every fixture model and adapter variant:
/// row 0 of the base batch is the CB example, row 1 the retain example, target layers [1,2], α=5 at step 30 of 150.
/// </summary>
public class CbLossParityTests(ITestOutputHelper log)
{
    public static TheoryData<string, string> Variants() => LoraParityTests.Variants();

    [Theory]
    [MemberData(nameof(Variants))]
    public void CircuitBreakerLossAndGradientsMatchReference(string type, string variant)
    {
        MoeLora.Torch.Runtime.TorchRuntime.EnsureInitialized(); // before any TorchSharp call (patches the native library)
        var dir = Path.Combine(Fixtures.Dir(type), variant);
        var reference = Safetensors.Load(Path.Combine(dir, "cb_reference.safetensors"));
        var inputs = Fixtures.Reference(type);
        using var holder = new DisposableModel(TorchModelFactory.Load(Path.Combine(Fixtures.Dir(type), "model")));
        var model = holder.Model;
        LoraInjector.LoadPeftAdapter(model, dir);
        var ids = inputs["input_ids"]; var mask = inputs["attention_mask"];
        var cb = new TokenBatch(ids[0..1], mask[0..1]);
        var retain = new TokenBatch(ids[1..2], mask[1..2]);
        var (rc, cc) = CoefficientSchedule.Create("dual", 5.0, 150).At(30);
        Assert.Equal(0.5, rc, 12); Assert.Equal(4.5, cc, 12);

        var result = CircuitBreakerLoss.Compute(model, cb, retain, [1, 2], rc, cc);
        result.Total.backward();

        var errors = new List<string>();
        void Check(string what, double err, double tol) { log.WriteLine($"{type}/{variant} {what}: {err:E2}"); if (err > tol) errors.Add($"{what} {err:E2}"); }
        double Scalar(string k) => reference[k].to(ScalarType.Float64).item<double>();
        Check("retain_loss", Math.Abs(result.Read().RetainLoss - Scalar("retain_loss")) / Scalar("retain_loss"), 1e-5);
        Check("cb_loss", Math.Abs(result.Read().CbLoss - Scalar("cb_loss")) / Scalar("cb_loss"), 1e-5);
        Check("total_loss", Fixtures.RelError(result.Total.reshape(1), reference["total_loss"].reshape(1)), 1e-5);

        var grads = LoraInjector.PeftNamedParameters(model).ToDictionary(p => "grad." + p.Name, p => p.Param);
        var expected = reference.Keys.Where(k => k.StartsWith("grad.", StringComparison.Ordinal)).ToHashSet();
        Assert.Equal(expected.Order(), grads.Keys.Order());
        foreach (var k in expected.Order())
        {
            var g = grads[k].grad ?? zeros_like(grads[k]);
            Check(k, Fixtures.RelError(g, reference[k]), 1e-4);
        }
        Assert.True(errors.Count == 0, $"{type}/{variant}: " + string.Join("; ", errors));
    }

    [Fact]
    public void DisablingAdaptersGivesTheBaseModel()
    {
        var inputs = Fixtures.Reference("mixtral");
        using var holder = new DisposableModel(TorchModelFactory.Load(Path.Combine(Fixtures.Dir("mixtral"), "model")));
        LoraInjector.LoadPeftAdapter(holder.Model, Path.Combine(Fixtures.Dir("mixtral"), "attn_plus_experts"));
        using (LoraInjector.DisableAdapters(holder.Model))
        using (var o = holder.Model.Forward(inputs["input_ids"], inputs["attention_mask"], outputHiddenStates: true))
            Assert.True(Fixtures.MaskedRelError(o.Logits, inputs["logits"], inputs["attention_mask"]) < 1e-5);
        var variant = Fixtures.Reference("mixtral", "attn_plus_experts");
        using (var o = holder.Model.Forward(inputs["input_ids"], inputs["attention_mask"], outputHiddenStates: true))
            Assert.True(Fixtures.MaskedRelError(o.Logits, variant["logits"], inputs["attention_mask"]) < 1e-5);
    }
}
