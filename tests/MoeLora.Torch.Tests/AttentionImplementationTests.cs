using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// SDPA (the default) against eager attention on the same model and LoRA adapter: logits at real tokens, the loss and
/// every LoRA gradient agree within 1e-4 (fp32), and nothing is NaN, padding rows included. The batch is 24 tokens
/// (longer than the fixtures' sliding window of 16 and Llama 4's chunk of 4) with the second row left-padded by 5, so
/// padded query rows, windows and chunks all bite; a second, unpadded batch takes SDPA's is_causal path.
/// </summary>
public class AttentionImplementationTests(ITestOutputHelper log)
{
    const int S = 24, Pad = 5;

    static string Model(string type) => Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe", type, "model");

    [Theory]
    [InlineData("qwen3_moe", true)]            // GQA, per-head q/k norm
    [InlineData("cohere2_moe", true)]          // sliding-window layers
    [InlineData("granitemoe_swa", true)]       // sliding window, custom attention scale
    [InlineData("mimo_v2_flash", true)]        // sliding layers, value head size
    [InlineData("llama4_text_chunked", true)]  // chunked mask
    [InlineData("deepseek_v2", true)]          // MLA: q/k wider than v, custom scaling
    [InlineData("qwen3_moe", false)]           // no padding: is_causal without a mask
    public void SdpaMatchesEagerWithLora(string type, bool leftPadded)
    {
        TorchRuntime.EnsureInitialized();
        using var h = new DisposableModel(TorchModelFactory.Load(Model(type)));
        var model = h.Model;
        var plan = LoraInjector.Plan(model, """
            {"r": 4, "lora_alpha": 8, "init_lora_weights": false,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"]}
            """);
        LoraInjector.Inject(model, plan, seed: 1);
        model.Train();
        var gen = new TorchSharp.torch.Generator(7);
        var ids = randint(0, model.VocabSize, [2, S], generator: gen, dtype: ScalarType.Int64);
        var mask = ones(2, S, ScalarType.Int64);
        if (leftPadded) mask[1, ..Pad] = tensor(0L);

        var eager = Run(model, AttentionImplementation.Eager, ids, mask);
        var sdpa = Run(model, AttentionImplementation.Sdpa, ids, mask);

        var errors = new List<string>();
        void Check(string what, double err) { log.WriteLine($"{type} {what}: {err:E2}"); if (!(err <= 1e-4)) errors.Add($"{what} {err:E2}"); }
        Assert.True(isfinite(sdpa.Logits).all().item<bool>(), $"{type}: SDPA logits have non-finite values");
        Check("logits", Fixtures.MaskedRelError(sdpa.Logits, eager.Logits, mask));
        Check("loss", Fixtures.RelError(sdpa.Loss.reshape(1), eager.Loss.reshape(1)));
        Assert.NotEmpty(eager.Grads);
        Assert.Equal(eager.Grads.Keys.Order(), sdpa.Grads.Keys.Order());
        foreach (var (name, g) in eager.Grads.OrderBy(kv => kv.Key))
        {
            Assert.True(isfinite(sdpa.Grads[name]).all().item<bool>(), $"{type}: SDPA gradient {name} has non-finite values");
            Check(name, Fixtures.RelError(sdpa.Grads[name], g));
        }
        Assert.True(errors.Count == 0, $"{type}: " + string.Join("; ", errors));
    }

    sealed record Result(Tensor Logits, Tensor Loss, Dictionary<string, Tensor> Grads);

    static Result Run(CausalLm model, AttentionImplementation impl, Tensor ids, Tensor mask)
    {
        model.Attention = impl;
        var trainable = LoraInjector.PeftNamedParameters(model).ToList();
        foreach (var (_, p) in trainable) p.grad?.zero_();
        using var output = model.Forward(ids, mask);
        // Next-token cross-entropy over real tokens only, as training computes it.
        var labels = ids.roll(-1, 1).masked_fill(mask.eq(0), -100);
        var logits = output.Logits;
        var loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[^1]), labels.reshape(-1), ignore_index: -100);
        loss.backward();
        var grads = trainable.Where(p => p.Param.grad is not null).ToDictionary(p => p.Name, p => p.Param.grad!.detach().clone());
        return new Result(logits.detach().clone(), loss.detach().clone(), grads);
    }
}
