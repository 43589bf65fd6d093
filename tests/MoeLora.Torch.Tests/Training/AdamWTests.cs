using MoeLora.Torch.Training;
using TorchSharp;
using static TorchSharp.torch;
using AdamW = MoeLora.Torch.Training.AdamW;
using Parameter = TorchSharp.Modules.Parameter;

namespace MoeLora.Torch.Tests.Training;

/// <summary>AdamW's multi-tensor step (torch's _foreach_* operators) against its per-parameter loop, bit for bit.</summary>
public class AdamWTests
{
    public AdamWTests() => Runtime.TorchRuntime.EnsureInitialized();

    static List<(string, Parameter)> Parameters(long seed)
    {
        var g = new Generator((ulong)seed);
        // Enough parameters of various shapes to split into several groups, one without a gradient, one in bf16.
        var shapes = new long[][] { [7], [3, 5], [2, 4, 6], [64, 1024], [1024, 64], [11] };
        var list = shapes.Select((s, i) => ($"p{i}", new Parameter(randn(s, generator: g)))).ToList();
        list.Add(("bf16", new Parameter(randn([16, 8], generator: g).to(ScalarType.BFloat16))));
        return list;
    }

    static Tensor[] Run(bool multiTensor)
    {
        var ps = Parameters(3);
        // Groups of at most 64 KiB: the 256 KiB parameters go alone, the small ones together.
        using var opt = new AdamW(ps, weightDecay: 0.1) { MultiTensor = multiTensor, GroupBytes = 64 << 10 };
        var g = new Generator(7);
        for (int step = 0; step < 3; step++)
        {
            foreach (var (name, p) in ps)
                if (name != "p1")
                {
                    using var _ = no_grad();
                    p.grad = randn(p.shape, generator: g).to(p.dtype);
                }
            opt.Step(1e-2 * (step + 1));
        }
        return [.. ps.Select(x => x.Item2.detach().clone()), .. opt.StateTensors().Select(kv => kv.Value.clone())];
    }

    [Fact]
    public void The_multi_tensor_step_equals_the_per_parameter_loop()
    {
        Assert.True(AdamW.MultiTensorAvailable, "this libtorch has no _foreach_* operators");
        var loop = Run(multiTensor: false);
        var foreachRun = Run(multiTensor: true);
        Assert.Equal(loop.Length, foreachRun.Length);
        for (int i = 0; i < loop.Length; i++)
            Assert.True(loop[i].to(ScalarType.Float32).equal(foreachRun[i].to(ScalarType.Float32)).all().item<bool>(), $"tensor {i} differs");
    }

    [Fact]
    public void ZeroGrad_frees_the_gradients_and_a_step_then_leaves_the_parameters_alone()
    {
        var ps = Parameters(5);
        using var opt = new AdamW(ps, weightDecay: 0.1);
        foreach (var (_, p) in ps)
        {
            using var _ = no_grad();
            p.grad = ones_like(p);
        }
        opt.Step(1e-2);
        opt.ZeroGrad();
        Assert.All(ps, x => Assert.Null(x.Item2.grad));
        // torch's AdamW skips a parameter without a gradient: no weight decay, no move along the old moments.
        var before = ps.Select(x => x.Item2.detach().clone()).ToList();
        opt.Step(1e-2);
        for (int i = 0; i < ps.Count; i++)
            Assert.True(before[i].equal(ps[i].Item2).all().item<bool>(), $"{ps[i].Item1} moved without a gradient");
    }
}
