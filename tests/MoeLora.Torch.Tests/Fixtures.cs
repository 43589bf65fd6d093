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
