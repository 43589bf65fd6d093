using MoeLora.Torch.IO;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using TorchSharp;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// LoRA parity with peft 0.21 on every fixture variant (train mode): logits, hidden states,
/// loss = mean(logits² · mask) and the gradient of every trainable tensor under PEFT's run-time names.
/// </summary>
public class LoraParityTests(ITestOutputHelper log)
{
    public static TheoryData<string, string> Variants()
    {
        var d = new TheoryData<string, string>();
        foreach (var m in Fixtures.AllModels)
            foreach (var v in new[] { "seed_targets", "attn_plus_experts" })
                if (Directory.Exists(Path.Combine(Fixtures.Dir(m), v))) d.Add(m, v);
        return d;
    }

    [Theory]
    [MemberData(nameof(Variants))]
    public void LoraForwardAndGradientsMatchPeft(string type, string variant)
    {
        var reference = Fixtures.Reference(type, variant);
        var inputs = Fixtures.Reference(type); // the variant files hold outputs only; inputs are the base batch
        using var holder = new DisposableModel(TorchModelFactory.Load(Path.Combine(Fixtures.Dir(type), "model")));
        var model = holder.Model;
        LoraInjector.LoadPeftAdapter(model, Path.Combine(Fixtures.Dir(type), variant));
        model.Train();
        var mask = inputs["attention_mask"];
        using var output = model.Forward(inputs["input_ids"], mask, outputHiddenStates: true);
        var loss = (output.Logits.pow(2) * mask.unsqueeze(-1)).mean();
        loss.backward();

        var errors = new List<string>();
        void Check(string what, double err, double tol) { log.WriteLine($"{type}/{variant} {what}: {err:E2}"); if (err > tol) errors.Add($"{what} {err:E2}"); }
        Check("logits", Fixtures.MaskedRelError(output.Logits, reference["logits"], mask), 1e-5);
        for (int i = 0; i < output.HiddenStates.Count; i++)
            Check($"hidden_states[{i}]", Fixtures.MaskedRelError(output.HiddenStates[i], reference["hidden_states"][i], mask), 1e-5);
        Check("loss", Fixtures.RelError(loss.reshape(1), reference["loss"]), 1e-5);

        var grads = LoraInjector.PeftNamedParameters(model).ToDictionary(p => "grad." + p.Name, p => p.Param);
        var expected = reference.Keys.Where(k => k.StartsWith("grad.", StringComparison.Ordinal)).ToHashSet();
        Assert.Equal(expected.OrderBy(x => x), grads.Keys.OrderBy(x => x));
        foreach (var k in expected.Order())
            Check(k, Fixtures.RelError(grads[k].grad!, reference[k]), 1e-4);
        Assert.True(errors.Count == 0, $"{type}/{variant}: " + string.Join("; ", errors));
    }

    [Theory]
    [MemberData(nameof(Variants))]
    public void SavedAdapterRoundTripsExactly(string type, string variant)
    {
        var src = Path.Combine(Fixtures.Dir(type), variant);
        using var holder = new DisposableModel(TorchModelFactory.Load(Path.Combine(Fixtures.Dir(type), "model")));
        var adapter = LoraInjector.LoadPeftAdapter(holder.Model, src);
        var outDir = Path.Combine(Path.GetTempPath(), $"moelora-rt-{Guid.NewGuid():N}");
        try
        {
            LoraInjector.SavePeftAdapter(holder.Model, adapter, outDir);
            var original = Safetensors.Load(Path.Combine(src, "adapter_model.safetensors"));
            var saved = Safetensors.Load(Path.Combine(outDir, "adapter_model.safetensors"));
            Assert.Equal(original.Keys.Order(), saved.Keys.Order());
            foreach (var (k, t) in original)
            {
                Assert.Equal(t.shape, saved[k].shape);
                Assert.Equal(t.dtype, saved[k].dtype);
                Assert.True(t.bytes.SequenceEqual(saved[k].bytes), k);
            }
            var cfg = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(src, "adapter_config.json")))!;
            var cfg2 = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "adapter_config.json")))!;
            Assert.True(System.Text.Json.Nodes.JsonNode.DeepEquals(cfg, cfg2));
        }
        finally { Directory.Delete(outDir, true); }
    }
}
