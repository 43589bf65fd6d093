using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests.Training;

/// <summary>The measured training steps of <c>report --measure-steps</c> and their causal-LM loss.</summary>
public class TrainingStepTests
{
    [Fact]
    public void Causal_lm_loss_is_the_mean_next_token_cross_entropy_over_counted_positions()
    {
        MoeLora.Torch.Runtime.TorchRuntime.EnsureInitialized();
        var gen = new Generator(3);
        using var logits = randn([2, 5, 11], generator: gen);
        using var ids = randint(0, 11, [2, 5], generator: gen, dtype: ScalarType.Int64);
        using var mask = ones_like(ids);
        mask[1, 3] = tensor(0L); // a padded position is not a target
        var lp = logits.log_softmax(-1);
        double sum = 0; int n = 0;
        for (int b = 0; b < 2; b++)
            for (int t = 0; t < 4; t++) // position t predicts token t+1; the last position predicts nothing
            {
                if (mask[b, t + 1].item<long>() == 0) continue;
                sum -= lp[b, t, ids[b, t + 1].item<long>()].item<float>();
                n++;
            }
        Assert.Equal(7, n);
        Assert.Equal(sum / n, CausalLmLoss.Compute(logits, ids, mask).item<float>(), 5);
    }

    static CausalLm AdaptedTinyModel()
    {
        var model = TorchModelFactory.Random(File.ReadAllText(Path.Combine(Fixtures.Dir("qwen3_moe"), "model", "config.json")), 0);
        LoraInjector.Inject(model, LoraInjector.Plan(model, """{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]}"""), seed: 0);
        return model;
    }

    [Fact]
    public void Lora_steps_train_the_adapters_with_finite_losses()
    {
        MoeLora.Torch.Runtime.TorchRuntime.EnsureInitialized();
        using var holder = new DisposableModel(AdaptedTinyModel());
        var model = holder.Model;
        var bBefore = LoraInjector.PeftNamedParameters(model).Where(p => p.Name.Contains(".lora_B.", StringComparison.Ordinal))
            .Select(p => p.Param.abs().sum().item<float>()).Sum();
        Assert.Equal(0, bBefore); // lora_B starts at zero
        var run = TrainingStep.Lora(model, batch: 2, tokens: 8, repeats: 2, seed: 1);
        Assert.Equal(3, run.Seconds.Count); // one warm-up + 2 timed
        Assert.All(run.Losses, l => Assert.True(double.IsFinite(l) && l > 0, $"loss {l}"));
        Assert.Equal(16, run.TokensPerStep);
        var bAfter = LoraInjector.PeftNamedParameters(model).Where(p => p.Name.Contains(".lora_B.", StringComparison.Ordinal))
            .Select(p => p.Param.abs().sum().item<float>()).Sum();
        Assert.True(bAfter > 0, "AdamW did not move lora_B");
        Assert.All(model.NamedParameters(), p => Assert.Null(p.Param.grad)); // gradients are released after the measurement
    }

    [Fact]
    public void First_circuit_breaker_step_sees_identical_states_retain_0_and_rerouting_1()
    {
        MoeLora.Torch.Runtime.TorchRuntime.EnsureInitialized();
        using var holder = new DisposableModel(AdaptedTinyModel());
        // lora_B = 0: the adapted passes equal the frozen ones, so L_ret = 0 and L_rr = mean ReLU(cos) = 1;
        // total = 0.5 · 0 + 4.5 · 1. Later steps have moved the adapters.
        var run = TrainingStep.CircuitBreaker(holder.Model, [1, 2], batch: 1, tokens: 6, repeats: 1, seed: 2);
        Assert.Equal(4.5, run.Losses[0], 4);
        Assert.NotEqual(4.5, run.Losses[1], 6);
        Assert.Equal(12, run.TokensPerStep);
    }
}
