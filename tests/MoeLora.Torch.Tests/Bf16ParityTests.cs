using MoeLora.Torch.IO;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// Every Data/hf-moe fixture run in bf16 (the dtype training uses) against its fp32 transformers reference. Where
/// MoeLora rounds an op to bf16 that transformers keeps in fp32 (or the other way round), the error grows layer by
/// layer well past bf16 rounding: dots1's routed experts summed in bf16 instead of fp32 gave 0.16 here, where
/// transformers' own bf16 run on an H100 gave 0.012. Matching the dtypes op by op keeps the logits within
/// <see cref="Bound"/> of fp32.
/// </summary>
public class Bf16ParityTests(ITestOutputHelper log)
{
    const double Bound = 4e-2;

    /// <summary>
    /// Fixtures where bf16 rounding flips a near-tied expert choice in these tiny random models, so bf16 is far from
    /// fp32 whatever the dtypes, with the evidence: transformers' own bf16 logits on an H100 as far from fp32 (MoeLora's
    /// within 1.6e-2 of transformers' there); the bf16-rounded weights alone, run in fp32, already that far; or the same
    /// code on another fixture matching transformers on the GPU. The last two were read op by op against transformers
    /// 5.17's source but not yet compared with its bf16 run.
    /// </summary>
    static readonly Dictionary<string, string> NearTies = new()
    {
        ["gpt_oss"] = "transformers' bf16 logits 0.19 from fp32 on an H100",
        ["lfm2_moe"] = "transformers' bf16 logits 0.19 from fp32 on an H100",
        ["aria_text"] = "transformers' bf16 logits 0.095 from fp32 on an H100",
        ["mellum"] = "transformers' bf16 logits 0.088 from fp32 on an H100",
        ["qwen3_next"] = "transformers' bf16 logits 0.074 from fp32 on an H100",
        ["phimoe"] = "transformers' bf16 logits 0.060 from fp32 on an H100",
        ["olmoe"] = "on the hf-tiny olmoe fixture transformers' and MoeLora's bf16 logits were both 0.12 from fp32 on an H100",
        ["axk2_sparse"] = "bf16-rounded weights run in fp32: 0.37 from the reference",
        // DBRX's attention used to run eager (scores rounded to bf16) where transformers 5.17 runs SDPA; this fixture
        // routes top-1 of 4 experts after a bf16 softmax, so that rounding decides ties
        // (AttentionImplementationTests.TiedRouting). Since it runs SDPA, MoeLora's bf16 logits equal transformers'
        // bf16 logits exactly on an H100 (BENCHMARKS.md, 2026-12-07 15:33); both are 0.23 from fp32.
        ["dbrx"] = "transformers' bf16 logits 0.23 from fp32 on an H100, equal to MoeLora's",
        ["mimo_v2_flash"] = "bf16-rounded weights run in fp32: 0.17 from the reference",
        ["jetmoe"] = "transformers' bf16 logits 0.57 from fp32 on an H100, equal to MoeLora's",
        ["zaya"] = "bf16-rounded weights run in fp32: 0.044 from the reference",
        ["glm4_moe"] = "fp32 top-2 logit gap 9.6e-4 at its first MoE layer, where bf16 leaves fp32 (ops as dots1's); no GPU comparison yet",
        ["hy_v4"] = "bf16 changes the expert choice of a few tokens whose router scores are nearly tied (0.36 from fp32); HyV4Tests checks bf16 up to the first MoE layer",
        ["minimax_m3_vl_text"] = "0.017 with bf16 sums of the weighted experts, 0.38 with transformers' fp32 sum; no GPU comparison yet",
        ["minimax_m3_vl_text_sparse"] = "bf16 flips the last layer's expert choice at one token (fp32 top-2 gap 2.4e-3; 0.26 from fp32, " +
            "0.016 before that layer); bf16-rounded weights run in fp32: 0.0083 from the reference; no GPU comparison yet",
    };

    /// <summary>
    /// Fixtures whose bf16 error grows layer by layer without a flip, under a looser bound: DeepSeek-V4 keeps its four
    /// hyper-connection streams in the model's dtype between sublayers and mixes them with a bf16 matmul
    /// (DeepseekV4DecoderLayer casts post and comb to it); the error grows smoothly over the layers (no jump at a router or the
    /// indexer, and the same with index_topk raised past every entry), against 0.015 for the bf16-rounded weights run in
    /// fp32. Not compared with transformers' bf16 run yet.
    /// </summary>
    static readonly Dictionary<string, (double Bound, string Why)> Accumulating = new()
    {
        ["deepseek_v4"] = (6e-2, "bf16 streams between sublayers: 0.047 from fp32, smoothly over the layers"),
    };

    static string Root => Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe");

    [Theory]
    [MemberData(nameof(MoeTypesParityTests.RunnableTypes), MemberType = typeof(MoeTypesParityTests))]
    public void Bf16LogitsStayNearTheFp32Reference(string type)
    {
        TorchRuntime.EnsureInitialized();
        var reference = Safetensors.Load(Path.Combine(Root, type, "reference.safetensors"));
        using var model = new DisposableModel(TorchModelFactory.Load(Path.Combine(Root, type, "model"), ScalarType.BFloat16));
        model.Model.Eval();
        using var _ = no_grad();
        var mask = reference["attention_mask"];
        using var output = model.Model.Forward(reference["input_ids"], mask, outputHiddenStates: true);
        var hs = Fixtures.HiddenStates(reference);
        var perLayer = Enumerable.Range(0, output.HiddenStates.Count)
            .Select(i => Fixtures.MaskedRelErrorPerToken(output.HiddenStates[i].to(ScalarType.Float32), hs[i], mask).ToString("E1", System.Globalization.CultureInfo.InvariantCulture));
        var err = Fixtures.MaskedRelError(output.Logits.to(ScalarType.Float32), reference["logits"], mask);
        log.WriteLine($"{type} bf16 logits vs fp32 reference: {err:E2}; hidden states {string.Join(" ", perLayer)}");
        Assert.True(isfinite(output.Logits).all().item<bool>(), $"{type}: bf16 logits have non-finite values");
        if (NearTies.TryGetValue(type, out var why))
        {
            log.WriteLine($"{type}: bound not applied ({why})");
            return;
        }
        var bound = Bound;
        if (Accumulating.TryGetValue(type, out var looser))
        {
            log.WriteLine($"{type}: bound {looser.Bound:E0} ({looser.Why})");
            bound = looser.Bound;
        }
        Assert.True(err <= bound, $"{type}: bf16 logits are {err:E2} from the fp32 reference (bound {bound:E0})");
    }
}
