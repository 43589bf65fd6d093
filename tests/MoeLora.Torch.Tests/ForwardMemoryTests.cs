using System.Text.Json.Nodes;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// A forward frees each decoder layer's intermediates before the next layer runs: the tensors alive after layer i+1
/// are those after layer i plus what the caller keeps (that layer's router logits and, when asked, its hidden state).
/// Counted with TorchSharp's per-thread live-tensor statistics, so the bound is on work, not time. Before the fix a
/// 512-token forward of Qwen3-30B-A3B held every layer's expert rows until it returned (17 GiB on an H100).
/// </summary>
public class ForwardMemoryTests
{
    public ForwardMemoryTests() => TorchRuntime.EnsureInitialized();

    static string Deeper(string fixture, int layers)
    {
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.Dir(fixture), "model", "config.json")))!.AsObject();
        config["num_hidden_layers"] = layers;
        return config.ToJsonString();
    }

    [Theory]
    [InlineData("qwen3_moe", false)]
    [InlineData("qwen3_moe", true)]
    [InlineData("deepseek_v3", true)]
    [InlineData("mixtral", false)]
    public void LiveTensorsDoNotGrowWithDepth(string fixture, bool withLora)
    {
        using var holder = new DisposableModel(TorchModelFactory.Random(Deeper(fixture, 6), 3));
        var model = holder.Model;
        if (withLora) RuntimeChecks.InjectWithNonZeroB(model, """{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}""");
        model.Eval();
        foreach (var outputHiddenStates in new[] { false, true })
        {
            var live = new List<long>();
            model.AfterLayer = () => live.Add(DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount);
            try
            {
                using var _ = no_grad();
                var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
                using var output = model.Forward(ids, mask, outputHiddenStates);
            }
            finally { model.AfterLayer = null; }
            Assert.Equal(6, live.Count);
            // Per layer: at most its router logits, the experts' selected counts (kept on the device until asked for,
            // so a forward reads nothing to the host) and its hidden state stay, plus a mask the first layers may cache.
            var growth = live.Zip(live.Skip(1), (a, b) => b - a).ToList();
            Assert.True(growth.Skip(1).All(g => g <= (outputHiddenStates ? 3 : 2)),
                $"{fixture}: live tensors after each layer {string.Join(", ", live)}");
        }
    }
}

/// <summary>
/// A training step's backward leaves no tensor handle per layer behind: the custom autograd functions (LoRA's
/// CastLinear, the experts' recompute, checkpointed layers, the chunked loss) dispose the gradient handed to them and
/// the handles they return (<see cref="Nn.BackwardHandles"/>). Left to .NET's finaliser, those handles kept a step's
/// layer-sized gradients on the device (an H200 saw device memory grow step after step).
/// </summary>
public class BackwardMemoryTests
{
    public BackwardMemoryTests() => TorchRuntime.EnsureInitialized();

    static long Leaked(string fixture, int layers, bool checkpointing)
    {
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(Fixtures.Dir(fixture), "model", "config.json")))!.AsObject();
        config["num_hidden_layers"] = layers;
        using var holder = new DisposableModel(TorchModelFactory.Random(config.ToJsonString(), 3, ScalarType.BFloat16));
        var model = holder.Model;
        RuntimeChecks.InjectWithNonZeroB(model, """{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}""");
        model.Train();
        model.GradientCheckpointing = checkpointing;
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        void Step()
        {
            using (NewDisposeScope())
            {
                var loss = model.CausalLmLoss(ids, mask);
                loss.backward();
            }
            Nn.BackwardHandles.Release();
        }
        // A first step leaves what a model keeps from step to step (each MoE layer's last selected counts, read to the
        // host only when asked for); the second may leave nothing more.
        Step();
        var before = DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount;
        Step();
        return DisposeScopeManager.Statistics.TensorStatistics.ThreadTotalLiveCount - before;
    }

    [Theory]
    [InlineData("qwen3_moe", false)]
    [InlineData("qwen3_moe", true)]
    public void BackwardLeavesNoHandlePerLayer(string fixture, bool checkpointing)
    {
        long shallow = Leaked(fixture, 2, checkpointing), deep = Leaked(fixture, 6, checkpointing);
        Assert.True(deep == shallow && deep <= 0, $"{fixture}: {shallow} handles left after a 2-layer step, {deep} after a 6-layer one");
    }
}
