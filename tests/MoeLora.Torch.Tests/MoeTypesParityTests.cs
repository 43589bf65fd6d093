using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Torch.IO;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// Runtime parity with transformers 5.17 on Data/hf-moe: one tiny random checkpoint per MoE type (made on the GPU host
/// by tools/oracle/discover_moe.py), loaded from its checkpoint layout, on a batch whose second row is left-padded.
/// Logits, every hidden state and the router logits must agree within 1e-4 (fp32) at the real tokens. Hidden states
/// come stacked, or one key per state where their shapes differ (hyper-connection streams, see <see cref="Fixtures.HiddenStates"/>). Types whose
/// family has no runtime are listed with their one-line reason by <see cref="RuntimeTreeTests"/>.
/// </summary>
public class MoeTypesParityTests(ITestOutputHelper log)
{
    const double Tolerance = 1e-4;

    static string Root => Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe");

    static ModelSpec Spec(string type) =>
        ArchitectureRegistry.Build(ModelConfig.Parse(File.ReadAllText(Path.Combine(Root, type, "model", "config.json")), type), Layout.V5);

    /// <summary>Every fixture whose model type MoeLora knows and can run.</summary>
    public static TheoryData<string> RunnableTypes()
    {
        var data = new TheoryData<string>();
        foreach (var dir in Directory.GetDirectories(Root).Order(StringComparer.Ordinal))
        {
            var type = Path.GetFileName(dir);
            try
            {
                if (Spec(type).Runtime is not null) data.Add(type);
            }
            catch (ConfigException)
            {
                // A type the analysis does not know: the Core coverage tests say so.
            }
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(RunnableTypes))]
    public void ForwardMatchesTransformersWithLeftPadding(string type)
    {
        TorchRuntime.EnsureInitialized();
        var reference = Safetensors.Load(Path.Combine(Root, type, "reference.safetensors"));
        using var model = new DisposableModel(TorchModelFactory.Load(Path.Combine(Root, type, "model")));
        model.Model.Eval();
        using var _ = no_grad();
        var mask = reference["attention_mask"];
        using var output = model.Model.Forward(reference["input_ids"], mask, outputHiddenStates: true);

        var errors = new List<string>();
        void Check(string what, double err) { log.WriteLine($"{type} {what}: {err:E2}"); if (!(err <= Tolerance)) errors.Add($"{what} {err:E2}"); }

        Check("logits", Fixtures.MaskedRelError(output.Logits, reference["logits"], mask));
        var hs = Fixtures.HiddenStates(reference);
        Assert.Equal(hs.Count, output.HiddenStates.Count);
        for (int i = 0; i < output.HiddenStates.Count; i++)
            Check($"hidden_states[{i}]", Fixtures.MaskedRelErrorPerToken(output.HiddenStates[i], hs[i], mask));
        var routerKeys = reference.Keys.Where(k => k.StartsWith("router_logits.", StringComparison.Ordinal))
            .OrderBy(k => int.Parse(k.Split('.')[1], System.Globalization.CultureInfo.InvariantCulture)).ToList();
        if (routerKeys.Count > 0)
        {
            Assert.Equal(routerKeys.Count, output.RouterLogits.Count);
            var tokMask = mask.reshape(-1);
            for (int i = 0; i < routerKeys.Count; i++)
                Check(routerKeys[i], Fixtures.MaskedRelError(output.RouterLogits[i], reference[routerKeys[i]], tokMask));
        }
        Assert.True(errors.Count == 0, $"{type}: " + string.Join("; ", errors));
    }
}
