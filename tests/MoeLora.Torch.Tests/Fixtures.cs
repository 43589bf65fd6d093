using MoeLora.Torch.IO;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>The hf-tiny fixtures copied into Data/ (transformers 5.17 + peft 0.21 references).</summary>
public static class Fixtures
{
    public static readonly string[] AllModels =
        ["llama", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "llama4_text", "deepseek_v3", "gpt_oss"];

    public static string Dir(string model) => Path.Combine(AppContext.BaseDirectory, "Data", "hf-tiny", model);

    public static Dictionary<string, Tensor> Reference(string model, string? variant = null)
    {
        TorchRuntime.EnsureInitialized();
        var d = variant is null ? Dir(model) : Path.Combine(Dir(model), variant);
        return Safetensors.Load(Path.Combine(d, "reference.safetensors"));
    }

    /// <summary>
    /// The reference's hidden states in order: one stacked <c>hidden_states</c> [L+1, B, S, H], or one key per state
    /// (<c>hidden_states.0</c>, <c>hidden_states.1</c>, ...) where they differ in shape (hyper-connection streams
    /// [B, S, n, H] before the last, normed [B, S, H]).
    /// </summary>
    public static IReadOnlyList<Tensor> HiddenStates(Dictionary<string, Tensor> reference)
    {
        if (reference.TryGetValue("hidden_states", out var stacked)) return Enumerable.Range(0, (int)stacked.shape[0]).Select(i => stacked[i]).ToList();
        var keyed = reference.Keys.Where(k => k.StartsWith("hidden_states.", StringComparison.Ordinal))
            .Select(k => (Index: int.Parse(k["hidden_states.".Length..], System.Globalization.CultureInfo.InvariantCulture), Key: k))
            .OrderBy(e => e.Index).ToList();
        if (keyed.Count == 0 || keyed[^1].Index != keyed.Count - 1) throw new InvalidDataException("reference has no hidden_states, or gaps in hidden_states.N");
        return keyed.Select(e => reference[e.Key]).ToList();
    }

    /// <summary>
    /// <see cref="MaskedRelError"/> of one state [B, S, ...] (any trailing dims, e.g. hyper-connection streams
    /// [B, S, n, H]) against mask [B, S]; the shapes must be equal.
    /// </summary>
    public static double MaskedRelErrorPerToken(Tensor a, Tensor b, Tensor mask)
    {
        if (!a.shape.SequenceEqual(b.shape)) throw new InvalidDataException($"shape [{string.Join(",", a.shape)}] != reference [{string.Join(",", b.shape)}]");
        return MaskedRelError(a.flatten(2), b.flatten(2), mask);
    }

    /// <summary>
    /// Max |a-b| over positions where mask==1, relative to max |b| there. <paramref name="a"/>, <paramref name="b"/>
    /// are [..., B, S, F] with mask [B, S].
    /// </summary>
    public static double MaskedRelError(Tensor a, Tensor b, Tensor mask)
    {
        using var scope = NewDisposeScope();
        var m = mask.to(ScalarType.Bool).unsqueeze(-1);
        var diff = (a.to(ScalarType.Float64) - b.to(ScalarType.Float64)).abs().masked_fill(m.logical_not(), 0).max().item<double>();
        var scale = b.to(ScalarType.Float64).abs().masked_fill(m.logical_not(), 0).max().item<double>();
        return diff / Math.Max(scale, 1e-12);
    }

    public static double RelError(Tensor a, Tensor b)
    {
        using var scope = NewDisposeScope();
        var diff = (a.to(ScalarType.Float64) - b.to(ScalarType.Float64)).abs().max().item<double>();
        return diff / Math.Max(b.to(ScalarType.Float64).abs().max().item<double>(), 1e-12);
    }
}

/// <summary>
/// Tests that seed, consume or save torch's global RNG (trainers: manual_seed and the RNG state in checkpoints;
/// dropout; unseeded randn) run one at a time, so a bit-exact resume test is not disturbed by another class.
/// </summary>
[CollectionDefinition(Name)]
public sealed class TorchGlobalRng
{
    public const string Name = "torch global RNG";
}
