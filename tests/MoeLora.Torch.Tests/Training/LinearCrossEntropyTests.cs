using MoeLora.Core.Memory;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests.Training;

/// <summary>
/// The chunked causal-LM loss (<see cref="LinearCrossEntropy"/>, <see cref="CausalLm.CausalLmLoss(Tensor, Tensor?)"/>)
/// against transformers' path through whole logits (<see cref="CausalLmLoss.Compute"/>): the same loss and the same
/// adapter gradients for any chunk size, with padding, a logits multiplier, a head bias and the model dtype.
/// </summary>
public class LinearCrossEntropyTests
{
    static string Model(string dir, string type) => Path.Combine(AppContext.BaseDirectory, "Data", dir, type, "model", "config.json");

    static CausalLm Adapted(string configPath, string targets = "\"q_proj\", \"v_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"")
    {
        var model = TorchModelFactory.Random(File.ReadAllText(configPath), 0);
        LoraInjector.Inject(model, LoraInjector.Plan(model, $$"""{"r": 4, "lora_alpha": 8, "target_modules": [{{targets}}]}"""), seed: 0);
        // lora_B starts at zero; move it so that every adapter's gradient depends on the loss's gradient everywhere.
        using (no_grad())
            foreach (var (name, p) in LoraInjector.PeftNamedParameters(model))
                if (name.Contains(".lora_B.", StringComparison.Ordinal)) p.add_(randn(p.shape, generator: new Generator(7)) * 0.05);
        model.Train();
        return model;
    }

    static (double Loss, Dictionary<string, Tensor> Grads) Step(CausalLm model, Func<Tensor> loss)
    {
        var l = loss();
        l.backward();
        var grads = LoraInjector.PeftNamedParameters(model).ToDictionary(p => p.Name, p => p.Param.grad!.detach().clone());
        foreach (var (_, p) in LoraInjector.PeftNamedParameters(model)) p.grad = null;
        return (l.item<float>(), grads);
    }

    /// <summary>transformers' path: the whole logits, then <see cref="CausalLmLoss.Compute"/>.</summary>
    static Tensor WholeLogitsLoss(CausalLm model, Tensor ids, Tensor mask)
    {
        using var output = model.Forward(ids, mask);
        return CausalLmLoss.Compute(output.Logits, ids, mask);
    }

    /// <summary>Two rows of 9 tokens, the second left-padded by 3 (its first labels are ignored).</summary>
    static (Tensor Ids, Tensor Mask) Batch(long vocab)
    {
        var ids = randint(0, vocab, [2, 9], generator: new Generator(11), dtype: ScalarType.Int64);
        var mask = ones_like(ids);
        mask[1, TensorIndex.Slice(0, 3)] = tensor(0L);
        return (ids, mask);
    }

    [Theory]
    [InlineData("hf-tiny", "qwen3_moe")]     // untied head, no multiplier
    [InlineData("hf-moe", "cohere2_moe")]    // logit_scale 0.0625, tied head
    public void Chunked_loss_and_gradients_equal_the_whole_logits_path_for_any_chunk(string dir, string type)
    {
        MoeLora.Torch.Runtime.TorchRuntime.EnsureInitialized();
        using var holder = new DisposableModel(Adapted(Model(dir, type)));
        var model = holder.Model;
        Assert.True(model.ChunkedLossApplies);
        var (ids, mask) = Batch(model.VocabSize);
        var reference = Step(model, () => WholeLogitsLoss(model, ids, mask));
        foreach (var chunk in new long[] { 1, 4, 7, 100 })
        {
            var chunked = Step(model, () => model.CausalLmLoss(ids, mask, chunk));
            Assert.Equal(reference.Loss, chunked.Loss, 5);
            Assert.Equal(reference.Grads.Keys, chunked.Grads.Keys);
            foreach (var (name, g) in reference.Grads)
                Assert.True(Fixtures.RelError(chunked.Grads[name], g) < 1e-5, $"{type} chunk {chunk}: {name} differs by {Fixtures.RelError(chunked.Grads[name], g):E2}");
        }
    }

    [Fact]
    public void Function_matches_autograd_through_logits_with_bias_multiplier_ignored_rows_and_bf16()
    {
        MoeLora.Torch.Runtime.TorchRuntime.EnsureInitialized();
        var gen = new Generator(3);
        foreach (var dtype in new[] { ScalarType.Float32, ScalarType.BFloat16 })
        {
            var w = randn([13, 6], generator: gen).to(dtype);
            var b = randn([13], generator: gen).to(dtype);
            var labels = randint(0, 13, [10], generator: gen, dtype: ScalarType.Int64);
            labels[2] = tensor(-100L);
            labels[9] = tensor(-100L);
            var h0 = randn([10, 6], generator: gen).to(dtype);

            var hRef = h0.detach().requires_grad_(true);
            var logits = nn.functional.linear(hRef, w, b) * 0.5;
            var lossRef = nn.functional.cross_entropy(logits.to(ScalarType.Float32), labels, ignore_index: -100);
            lossRef.backward();

            var h = h0.detach().requires_grad_(true);
            var loss = LinearCrossEntropy.Apply(h, labels, new LinearCrossEntropy.Head(w, b, 0.5, ChunkTokens: 3));
            loss.backward();

            Assert.Equal(lossRef.item<float>(), loss.item<float>(), 5);
            // Each row's gradient is formed as autograd forms it, cast to the model dtype before the head's matmul.
            var tol = dtype == ScalarType.Float32 ? 1e-6 : 1e-2;
            Assert.True(Fixtures.RelError(h.grad!, hRef.grad!) < tol, $"{dtype}: {Fixtures.RelError(h.grad!, hRef.grad!):E2}");
            Assert.Equal(0, h.grad![2].abs().sum().to(ScalarType.Float32).item<float>()); // an ignored row gets no gradient
        }
    }

    [Fact]
    public void An_adapted_head_takes_the_logits_path()
    {
        MoeLora.Torch.Runtime.TorchRuntime.EnsureInitialized();
        using var holder = new DisposableModel(Adapted(Model("hf-tiny", "qwen3_moe"), "\"q_proj\", \"lm_head\""));
        var model = holder.Model;
        Assert.False(model.ChunkedLossApplies);
        var (ids, mask) = Batch(model.VocabSize);
        var reference = Step(model, () => WholeLogitsLoss(model, ids, mask));
        var loss = Step(model, () => model.CausalLmLoss(ids, mask));
        Assert.Equal(reference.Loss, loss.Loss, 6);
        Assert.Contains(loss.Grads.Keys, k => k.Contains("lm_head.lora_A", StringComparison.Ordinal));
        Assert.All(reference.Grads, kv => Assert.True(Fixtures.RelError(loss.Grads[kv.Key], kv.Value) < 1e-6, kv.Key));
    }

    [Fact]
    public void Chunks_hold_at_most_the_budgeted_fp32_logits()
    {
        Assert.Equal(110, ChunkedLmLoss.ChunkTokens(151_936)); // Qwen3: 64 MiB / (4 B × 151,936)
        Assert.True(4 * ChunkedLmLoss.ChunkTokens(151_936) * 151_936 <= ChunkedLmLoss.ChunkLogitBytes);
        Assert.Equal(1, ChunkedLmLoss.ChunkTokens(1L << 30));
    }
}
