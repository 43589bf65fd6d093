using MoeLora.Core.Architectures.Runtime;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// The per-forward half-rotation tables (<see cref="HalfRotation"/>) rotate exactly as transformers' rotate_half
/// formula (<see cref="Rotary.ApplyHalf"/>), and a forward makes them once for all its layers.
/// </summary>
public class HalfRotationTests
{
    public HalfRotationTests() => TorchRuntime.EnsureInitialized();

    static ForwardContext Context(long batch, long length) => new()
    {
        Positions = arange(length, ScalarType.Int64).unsqueeze(0).expand(batch, -1).contiguous(),
        AttentionMask = ones(batch, length, ScalarType.Int64),
        DType = ScalarType.BFloat16,
    };

    [Theory]
    [InlineData(ScalarType.Float32)]
    [InlineData(ScalarType.BFloat16)]
    public void Rotates_bit_for_bit_as_rotate_half(ScalarType dtype)
    {
        using var scope = NewDisposeScope();
        var rope = Rotary.FromSettings(new RopeSettings("default", 10000.0, 32));
        var ctx = Context(2, 24);
        // A transposed (non-contiguous) q, as attention hands it over.
        var x = randn(new long[] { 2, 24, 6, 32 }, generator: new Generator(5)).to(dtype).transpose(1, 2);
        var (cos, sin) = rope.CosSin(ctx.Positions, dtype);
        var expected = Rotary.ApplyHalf(x, cos, sin);
        var actual = rope.Half(ctx, dtype).Apply(x);
        Assert.Equal(expected.dtype, actual.dtype);
        Assert.True(expected.eq(actual).all().item<bool>(), $"max difference {(expected - actual).abs().max().to(ScalarType.Float32).item<float>():E2}");
    }

    [Fact]
    public void A_wider_head_has_its_first_dims_rotated_and_the_rest_passed_through()
    {
        using var scope = NewDisposeScope();
        var rope = Rotary.FromSettings(new RopeSettings("default", 10000.0, 16));   // partial rotary: 16 of 40 dims
        var ctx = Context(2, 12);
        var x = randn(new long[] { 2, 12, 3, 40 }, generator: new Generator(6)).to(ScalarType.BFloat16).transpose(1, 2);
        var (cos, sin) = rope.CosSin(ctx.Positions, ScalarType.BFloat16);
        var parts = x.split([16, 24], -1);
        var expected = cat([Rotary.ApplyHalf(parts[0], cos, sin), parts[1]], -1);
        Assert.True(expected.eq(rope.Half(ctx, ScalarType.BFloat16).Apply(x)).all().item<bool>());
    }

    [Fact]
    public void A_forward_makes_the_tables_once_per_rotary_and_dtype()
    {
        using var scope = NewDisposeScope();
        var rope = Rotary.FromSettings(new RopeSettings("default", 10000.0, 16));
        var other = Rotary.FromSettings(new RopeSettings("default", 500000.0, 16));
        var ctx = Context(1, 8);
        var first = rope.Half(ctx, ScalarType.BFloat16);
        Assert.Same(first, rope.Half(ctx, ScalarType.BFloat16));
        Assert.NotSame(first, rope.Half(ctx, ScalarType.Float32));
        Assert.NotSame(first, other.Half(ctx, ScalarType.BFloat16));
        // Held for later layers: a layer's cleanup must not free them.
        Assert.Contains(first.Cos, ctx.Held());
        Assert.NotSame(first, rope.Half(Context(1, 8), ScalarType.BFloat16));
    }
}
