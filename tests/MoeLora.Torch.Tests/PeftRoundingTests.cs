using MoeLora.Torch.Lora;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// A bf16 layer with fp32 adapters rounds as PEFT's <c>lora.Linear.forward</c> does: the fp32 adapter output joins the
/// bf16 base output in fp32 (torch's type promotion) and the sum is cast once. So the adapter's output on a bf16 base
/// must equal its output on the same base widened to fp32, cast to bf16 once. Rounding the delta to bf16 before adding
/// (MoeLora until 2026-12-07) breaks that on some elements, by one unit in the last place.
/// </summary>
[Collection(TorchGlobalRng.Name)]
public class PeftRoundingTests
{
    public PeftRoundingTests() => TorchRuntime.EnsureInitialized();

    const long In = 64, Out = 512, Rank = 8;

    // Base outputs near ±100 and adapter outputs near ±3 (the scale where one bf16 unit is 0.5): the two roundings then
    // disagree on a few percent of the elements.
    static Linear BaseLayer() => new(In, Out, hasBias: false, new Init(ScalarType.BFloat16, CPU, 12.5, new Generator(11)));

    static Tensor Inputs() => randn(new long[] { 2, 16, In }, generator: new Generator(12)).to(ScalarType.BFloat16);

    static (Tensor A, Tensor B) Factors() =>
        (randn(new long[] { Rank, In }, generator: new Generator(13)) * 0.4, randn(new long[] { Out, Rank }, generator: new Generator(14)) * 0.4);

    static void AssertRoundsOnce(Linear layer, ILinearAdapter adapter)
    {
        using var _ = no_grad();
        var x = Inputs();
        var baseOutput = nn.functional.linear(x, layer.weight);
        var narrow = adapter.Apply(x, baseOutput, layer);
        var once = adapter.Apply(x, baseOutput.to(ScalarType.Float32), layer).to(ScalarType.BFloat16);
        Assert.Equal(ScalarType.BFloat16, narrow.dtype);
        long differing = narrow.ne(once).sum().item<long>();
        Assert.True(differing == 0, $"{differing} of {narrow.numel()} elements differ from the once-rounded sum");
    }

    [Fact]
    public void Lora_rounds_the_sum_once()
    {
        var layer = BaseLayer();
        var (a, b) = Factors();
        var lora = new LoraLinear(layer, "default", a, b, scaling: 2.0, rank: (int)Rank, dropout: 0);
        AssertRoundsOnce(layer, lora);
    }

    [Fact]
    public void Dora_rounds_the_sum_once()
    {
        var layer = BaseLayer();
        var (a, b) = Factors();
        var dora = new DoraLinear(layer, "default", a, b, scaling: 2.0, rank: (int)Rank, dropout: 0);
        AssertRoundsOnce(layer, dora);
    }

    [Fact]
    public void A_target_parameter_on_a_Linear_adds_its_delta_to_the_weight()
    {
        // target_parameters on a Linear's weight (Llama 4's router): PEFT's parametrization multiplies by
        // W + ΔW.to(W.dtype), one bf16 product, where an extra x·ΔWᵀ term would add two rounded products.
        using var _ = no_grad();
        var layer = BaseLayer();
        var (a, b) = Factors();
        var wrapper = new ParamLora2D(layer, layer, "weight", "default", a, b, scaling: 2.0, rank: (int)Rank);
        var x = Inputs();
        var delta = (matmul(wrapper.B.weight, wrapper.A.weight) * 2.0).to(ScalarType.BFloat16); // the factors own a and b now
        var expected = nn.functional.linear(x, layer.weight + delta);
        var twoProducts = nn.functional.linear(x, layer.weight) + nn.functional.linear(x, delta);
        Assert.True(expected.ne(twoProducts).sum().item<long>() > 0, "the two formulas agree at this scale: the test could not fail");
        Assert.True(layer.Forward(x).eq(expected).all().item<bool>(), "differs from linear(x, W + ΔW)");
        wrapper.Enabled = false;
        Assert.True(layer.Forward(x).eq(nn.functional.linear(x, layer.weight)).all().item<bool>(), "a disabled adapter changed the output");
    }

    [Fact]
    public void Rounding_the_delta_first_differs_at_this_scale()
    {
        // The tests above can fail: at these magnitudes the twice-rounded sum differs from the once-rounded one.
        using var _ = no_grad();
        var layer = BaseLayer();
        var (a, b) = Factors();
        var x = Inputs();
        var baseOutput = nn.functional.linear(x, layer.weight);
        var delta = nn.functional.linear(nn.functional.linear(x.to(ScalarType.Float32), a), b) * 2.0;
        var twice = baseOutput + delta.to(ScalarType.BFloat16);
        var once = (baseOutput + delta).to(ScalarType.BFloat16);
        Assert.True(twice.ne(once).sum().item<long>() > 0);
    }
}
