using MoeLora.Torch.Models;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>Base-model parity with transformers 5.17 on every fixture: logits, all hidden states, router logits.</summary>
public class ParityTests(ITestOutputHelper log)
{
    const double Tolerance = 1e-5;

    public static TheoryData<string> Models => new(Fixtures.AllModels);

    [Theory]
    [MemberData(nameof(Models))]
    public void BaseForwardMatchesTransformers(string type)
    {
        var reference = Fixtures.Reference(type);
        using var model = new DisposableModel(TorchModelFactory.Load(Path.Combine(Fixtures.Dir(type), "model")));
        model.Model.Eval();
        using var _ = no_grad();
        var mask = reference["attention_mask"];
        using var output = model.Model.Forward(reference["input_ids"], mask, outputHiddenStates: true);

        var errors = new List<string>();
        void Check(string what, double err) { log.WriteLine($"{type} {what}: {err:E2}"); if (err > Tolerance) errors.Add($"{what} {err:E2}"); }

        Check("logits", Fixtures.MaskedRelError(output.Logits, reference["logits"], mask));
        var hs = reference["hidden_states"];
        Assert.Equal(hs.shape[0], output.HiddenStates.Count);
        for (int i = 0; i < output.HiddenStates.Count; i++)
            Check($"hidden_states[{i}]", Fixtures.MaskedRelError(output.HiddenStates[i], hs[i], mask));
        var routerKeys = reference.Keys.Where(k => k.StartsWith("router_logits.", StringComparison.Ordinal)).OrderBy(k => int.Parse(k.Split('.')[1])).ToList();
        if (routerKeys.Count > 0)
        {
            Assert.Equal(routerKeys.Count, output.RouterLogits.Count);
            var tokMask = mask.reshape(-1, 1);
            for (int i = 0; i < routerKeys.Count; i++)
                Check(routerKeys[i], Fixtures.MaskedRelError(output.RouterLogits[i], reference[routerKeys[i]], tokMask.squeeze(-1)));
        }
        Assert.True(errors.Count == 0, $"{type}: " + string.Join("; ", errors));
    }
}

/// <summary>Disposes a model's tensors at the end of a test.</summary>
public sealed class DisposableModel(CausalLm model) : IDisposable
{
    public CausalLm Model { get; } = model;
    public void Dispose() { foreach (var (_, t) in Model.StateDict()) t.Dispose(); }
}
