using MoeLora.Torch.IO;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>Checks the per-family runtime tests share: a left-padded batch, padded row vs the row alone, the tree against
/// Core's, LoRA gradients.</summary>
public static class RuntimeChecks
{
    /// <summary>Two rows of 9 tokens; the second is left-padded by 3.</summary>
    public static (Tensor Ids, Tensor Mask) LeftPaddedBatch()
    {
        var ids = tensor(new long[,] { { 3, 4, 5, 6, 7, 8, 9, 10, 11 }, { 0, 0, 0, 5, 9, 13, 2, 40, 7 } });
        var mask = tensor(new long[,] { { 1, 1, 1, 1, 1, 1, 1, 1, 1 }, { 0, 0, 0, 1, 1, 1, 1, 1, 1 } });
        return (ids, mask);
    }

    /// <summary>
    /// Where rope is relative and nothing else reads absolute positions, the left-padded row's logits at its real
    /// tokens equal those of its tokens run alone (a random model of <paramref name="config"/>).
    /// </summary>
    public static void PaddedRowEqualsTheRowAlone(string config, double tolerance = 1e-5)
    {
        using var h = new DisposableModel(TorchModelFactory.Random(config, 5));
        PaddedRowEqualsTheRowAlone(h.Model, tolerance);
    }

    /// <summary>The padded row of <see cref="LeftPaddedBatch"/> gives the logits its real tokens give alone.</summary>
    public static void PaddedRowEqualsTheRowAlone(CausalLm model, double tolerance = 1e-5)
    {
        using var _ = no_grad();
        var (ids, mask) = LeftPaddedBatch();
        using var batch = model.Forward(ids, mask);
        using var alone = model.Forward(ids[1, 3..].unsqueeze(0));
        var err = Fixtures.RelError(batch.Logits[1, 3..], alone.Logits[0]);
        Assert.True(err < tolerance, $"padded row vs alone: {err:E2}");
    }

    /// <summary>
    /// Injects <paramref name="loraConfig"/> and gives every lora_B values: PEFT initialises B to zero, which would
    /// leave A without gradient and the adapters without effect. Each B is drawn from a generator seeded by
    /// <paramref name="seed"/> of its name (default 3 for all). Returns the trainable tensors under PEFT's names.
    /// </summary>
    public static List<(string Name, Parameter Param)> InjectWithNonZeroB(CausalLm model, string loraConfig, Func<string, ulong>? seed = null)
    {
        LoraInjector.Inject(model, LoraInjector.Plan(model, loraConfig));
        var lora = LoraInjector.PeftNamedParameters(model).Where(p => p.Param.requires_grad).ToList();
        using (no_grad())
            foreach (var (name, p) in lora)
                if (name.Contains(".lora_B.", StringComparison.Ordinal)) p.normal_(0, 0.1, generator: new Generator(seed?.Invoke(name) ?? 3));
        return lora;
    }

    /// <summary>
    /// One backward of a squared-logits loss on the left-padded batch in train mode: the logits and every adapter
    /// tensor's gradient (zeros where none arrived).
    /// </summary>
    public static (Tensor Logits, Dictionary<string, Tensor> Grads) Backward(CausalLm model, IEnumerable<(string Name, Parameter Param)> lora)
    {
        model.Train();
        var (ids, mask) = LeftPaddedBatch();
        var o = model.Forward(ids, mask);
        (o.Logits * mask.unsqueeze(-1)).pow(2).mean().backward();
        return (o.Logits.detach(), lora.ToDictionary(p => p.Name, p => p.Param.grad is { } g ? g.detach().clone() : zeros_like(p.Param)));
    }

    /// <summary>
    /// Merges <paramref name="adapted"/> into <paramref name="modelDir"/>'s checkpoint, written to <paramref name="outDir"/>,
    /// and checks what a merge into a saved layout promises: the checkpoint's own keys and shapes come back, the merged
    /// checkpoint gives the adapted logits on <see cref="LeftPaddedBatch"/> (1e-5), and those differ from the plain
    /// checkpoint's (else the check proves nothing). Returns the merged checkpoint's header entries.
    /// </summary>
    public static IReadOnlyList<Safetensors.Entry> MergesBackIntoTheSavedLayout(CausalLm adapted, string modelDir, string outDir)
    {
        adapted.Eval();
        var (ids, mask) = LeftPaddedBatch();
        using var _ = no_grad();
        using var want = adapted.Forward(ids, mask);
        LoraMerge.SaveHubCheckpoint(adapted, modelDir, outDir);
        var (inKeys, _, _) = Safetensors.ReadHeader(Path.Combine(modelDir, "model.safetensors"));
        var (outKeys, _, _) = Safetensors.ReadHeader(Path.Combine(outDir, "model.safetensors"));
        Assert.Equal(inKeys.Select(k => (k.Name, string.Join(",", k.Shape))), outKeys.Select(k => (k.Name, string.Join(",", k.Shape))));
        using var merged = new DisposableModel(TorchModelFactory.Load(outDir));
        using var got = merged.Model.Forward(ids, mask);
        Assert.True(Fixtures.MaskedRelError(got.Logits, want.Logits, mask) < 1e-5);
        using var plain = new DisposableModel(TorchModelFactory.Load(modelDir));
        using var before = plain.Model.Forward(ids, mask);
        Assert.True(Fixtures.MaskedRelError(before.Logits, want.Logits, mask) > 1e-4);
        return outKeys;
    }

    /// <summary>One backward on the left-padded batch: every adapter tensor gets a finite, non-zero gradient.</summary>
    public static void EveryAdapterGetsGradient(CausalLm model, IEnumerable<(string Name, Parameter Param)> lora) =>
        AssertGradients(Backward(model, lora).Grads);

    /// <summary>named_parameters() of a random model of <paramref name="config"/>: Core's tree, names, shapes and order.</summary>
    public static void ParametersEqualCoresTree(string config)
    {
        var spec = TorchModelFactory.Spec(config);
        using var h = new DisposableModel(TorchModelFactory.Random(config, 0));
        Assert.Equal(spec.Tree.Parameters.Select(p => $"{p.Name} [{string.Join(",", p.Shape)}]"),
            h.Model.NamedParameters().Select(p => $"{p.Name} [{string.Join(",", p.Param.shape)}]"));
    }

    /// <summary>
    /// <see cref="InjectWithNonZeroB"/> (each B seeded by its name's length) then <see cref="Backward"/>: the logits and
    /// every adapter tensor's gradient.
    /// </summary>
    public static (Tensor Logits, Dictionary<string, Tensor> Grads) LoraStep(CausalLm model, string loraConfig) =>
        Backward(model, InjectWithNonZeroB(model, loraConfig, name => (ulong)name.Length));

    /// <summary>Every gradient finite; non-zero except where <paramref name="unused"/> says the adapter never acts (then zero).</summary>
    public static void AssertGradients(Dictionary<string, Tensor> grads, Func<string, bool>? unused = null)
    {
        foreach (var (name, g) in grads)
        {
            Assert.False(g.isnan().any().item<bool>() || g.isinf().any().item<bool>(), $"{name}: non-finite gradient");
            bool none = unused?.Invoke(name) ?? false;
            var sum = g.abs().sum().item<float>();
            Assert.True(none ? sum == 0 : sum > 0, none ? $"{name}: an adapter transformers never applies got a gradient" : $"{name}: zero gradient");
        }
    }
}
