using MoeLora.Core.Architectures.Runtime;
using MoeLora.Torch.Nn;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// The sequence-dependent rope rules (longrope, dynamic NTK) against their own definitions: which table a sequence
/// gets, and the state dynamic keeps between forwards. Parity with transformers is RopeAndTyingParityTests'.
/// </summary>
public class RotaryRuleTests
{
    const long Dim = 16;
    static readonly double[] Ones = Enumerable.Repeat(1.0, (int)Dim / 2).ToArray();
    static readonly double[] Long = [1.0, 1.2, 1.6, 2.4, 3.5, 5.0, 7.0, 9.0];

    static Tensor Positions(long length) => arange(length, ScalarType.Int64).unsqueeze(0);

    static Tensor Cos(Rotary r, long length) => r.CosSin(Positions(length), ScalarType.Float32).Cos;

    static RopeSettings LongRope(double[] shortFactor, double[] longFactor, bool phimoe = false) =>
        new("longrope", 10000.0, Dim, OriginalMaxPositionEmbeddings: 16, MaxPositionEmbeddings: 64, ShortFactor: shortFactor,
            LongFactor: longFactor, ShortMScale: 1.1, LongMScale: 1.3, PhimoeRotary: phimoe);

    static void Close(Tensor expected, Tensor actual) =>
        Assert.True(allclose(expected, actual, 1e-6, 1e-6), $"max difference {(expected - actual).abs().max().item<float>():E2}");

    [Fact]
    public void Longrope_within_the_original_length_is_the_default_table_times_the_attention_factor()
    {
        using var scope = NewDisposeScope();
        var rope = Rotary.FromSettings(LongRope(Ones, Long));
        double attention = Math.Sqrt(1 + Math.Log(64 / 16.0) / Math.Log(16)); // factor = max / original positions
        Assert.Equal(attention, rope.AttentionScaling, 12);
        var plain = Rotary.FromSettings(new RopeSettings("default", 10000.0, Dim));
        Close(Cos(plain, 16) * attention, Cos(rope, 16));
    }

    [Fact]
    public void Longrope_past_the_original_length_switches_to_the_long_factors()
    {
        using var scope = NewDisposeScope();
        var mixed = Rotary.FromSettings(LongRope(Ones, Long));
        var allLong = Rotary.FromSettings(LongRope(Long, Long));
        Close(Cos(allLong, 17), Cos(mixed, 17));
        Assert.False(allclose(Cos(allLong, 16), Cos(mixed, 16)));
    }

    [Fact]
    public void Phimoe_keeps_the_short_factors_and_scales_by_short_or_long_mscale()
    {
        using var scope = NewDisposeScope();
        var generic = Rotary.FromSettings(LongRope(Ones, Long));
        var phimoe = Rotary.FromSettings(LongRope(Ones, Long, phimoe: true));
        Close(Cos(generic, 16) / generic.AttentionScaling * 1.1, Cos(phimoe, 16));
        // Past the original length only the scale changes: transformers 5.17's PhiMoE rotary keeps the short factors.
        var shortOnly = Rotary.FromSettings(LongRope(Ones, Ones));
        Close(Cos(shortOnly, 20) / shortOnly.AttentionScaling * 1.3, Cos(phimoe, 20));
    }

    [Fact]
    public void Dynamic_grows_with_the_sequence_keeps_its_table_and_resets_under_the_maximum()
    {
        using var scope = NewDisposeScope();
        var settings = new RopeSettings("dynamic", 10000.0, Dim, Factor: 2.0, MaxPositionEmbeddings: 16);
        var plain = Rotary.FromSettings(new RopeSettings("default", 10000.0, Dim));
        var dynamic = Rotary.FromSettings(settings);
        Close(Cos(plain, 16), Cos(dynamic, 16));                  // within max_position_embeddings: the default table
        var at24 = Cos(dynamic, 24);
        Assert.False(allclose(Cos(plain, 24), at24));              // past it: a larger base
        var fresh = Rotary.FromSettings(settings);
        var at20Fresh = Cos(fresh, 20);
        var at20After24 = Cos(dynamic, 20);                         // still the table made for 24
        Close(at24.narrow(1, 0, 20), at20After24);
        Assert.False(allclose(at20Fresh, at20After24));
        Close(Cos(plain, 8), Cos(dynamic, 8));                     // under the maximum: back to the default table
        Close(at20Fresh, Cos(dynamic, 20));                        // and grows again from there
    }

    [Fact]
    public void Longrope_refuses_factor_lists_of_the_wrong_length()
    {
        var e = Assert.Throws<InvalidDataException>(() => Rotary.FromSettings(LongRope(Ones.Take(3).ToArray(), Long)));
        Assert.Contains("8 'short_factor'", e.Message);
    }
}
