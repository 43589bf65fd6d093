using System.Text.Json.Nodes;
using MoeLora.Core;
using MoeLora.Sources.Adapters;
using MoeLora.Sources.Safetensors;
using Xunit;

namespace MoeLora.Sources.Tests;

/// <summary>
/// Conversions move bytes only, so ΔW per expert must be bit-identical before and after, and fused → per-expert →
/// fused must give back the very same tensors. The fused adapters are the ones PEFT 0.21 saved for the hf-tiny fixtures.
/// </summary>
public class AdapterConvertTests
{
    public static readonly TheoryData<string> Fused = new() { "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "llama4_text", "gpt_oss" };

    private static AdapterFolder Fixture(string model, string variant = "attn_plus_experts") =>
        AdapterFolder.Read(Path.Combine(AppContext.BaseDirectory, "Data", "hf-tiny", model, variant));

    private static void SameDelta(AdapterFolder x, AdapterFolder y)
    {
        var dx = AdapterDelta.PerExpert(x);
        var dy = AdapterDelta.PerExpert(y);
        Assert.Equal(dx.Keys, dy.Keys);
        foreach (var (k, a) in dx)
        {
            var b = dy[k];
            Assert.Equal(a.GetLength(0), b.GetLength(0));
            Assert.Equal(a.GetLength(1), b.GetLength(1));
            for (int o = 0; o < a.GetLength(0); o++)
                for (int i = 0; i < a.GetLength(1); i++)
                    Assert.True(a[o, i] == b[o, i], $"{k}[{o},{i}]: {a[o, i]} vs {b[o, i]}");
        }
        Assert.Contains(dx, kv => kv.Key.Contains(".experts.0."));
        Assert.Contains(dx.Values, d => d.Cast<double>().Any(v => v != 0));
    }

    [Theory, MemberData(nameof(Fused))]
    public void FusedToPerExpertKeepsEveryExpertDelta_AndRoundTripsBitExact(string model)
    {
        var fused = Fixture(model);
        var per = AdapterConvert.Convert(fused, "per-expert");
        Assert.Contains(per.Tensors, t => t.Name.Contains(".experts.0.gate_proj.lora_A"));
        Assert.DoesNotContain(per.Tensors, t => t.Name.Contains("base_layer"));
        SameDelta(fused, per);
        var back = AdapterConvert.Convert(per, "peft-v5");
        Assert.Equal(fused.Tensors.Select(t => t.Name), back.Tensors.Select(t => t.Name));
        foreach (var (a, b) in fused.Tensors.Zip(back.Tensors))
        {
            Assert.Equal(a.Shape, b.Shape);
            Assert.True(a.Data.AsSpan().SequenceEqual(b.Data), a.Name);
        }
        Assert.Equal(LoraPairs.TargetParameters(fused.Config).Order(), LoraPairs.TargetParameters(back.Config).Order());
    }

    [Theory, MemberData(nameof(Fused))]
    public void VllmFormatHasOneRankAndTheSameDeltas(string model)
    {
        var fused = Fixture(model);
        var vllm = AdapterConvert.Convert(fused, "vllm");
        SameDelta(fused, vllm);
        int r = LoraPairs.Int(vllm.Config, "r", -1);
        Assert.All(vllm.Tensors.Where(t => t.Name.EndsWith("lora_A.weight")), t => Assert.Equal(r, t.Shape[0]));
        Assert.Empty((JsonObject)vllm.Config["rank_pattern"]!);
        // vLLM's 2-D loader needs gate, up and down for every expert; the fixtures adapt both fused tensors.
        Assert.DoesNotContain(AdapterInspector.Inspect(vllm).Traps, t => t.StartsWith("vLLM would drop"));
    }

    [Fact]
    public void WrittenFolderReadsBackIdentically()
    {
        var per = AdapterConvert.Convert(Fixture("qwen3_moe"), "per-expert");
        string dir = Path.Combine(Path.GetTempPath(), "moelora-adapter-" + Guid.NewGuid().ToString("N"));
        try
        {
            per.Write(dir);
            var again = AdapterFolder.Read(dir);
            Assert.Equal(per.Tensors.Select(t => t.Name).Order(), again.Tensors.Select(t => t.Name));
            SameDelta(per, again);
            Assert.Throws<UserInputException>(() => per.Write(dir));
            Assert.Empty(Directory.GetDirectories(Path.GetDirectoryName(dir)!, "." + Path.GetFileName(dir) + ".tmp-*"));
        }
        finally { if (Directory.Exists(dir)) Directory.Delete(dir, true); }
    }

    // A per-expert adapter as PEFT <= 0.18 saved it: separate gate and up LoRAs with their own A.
    private static AdapterFolder PerExpert(int experts, int r, int hidden, int inter, bool withUp = true, bool withDown = true, int seed = 1)
    {
        var rng = new Random(seed);
        AdapterTensor T(string name, long rows, long cols)
        {
            var data = new byte[rows * cols * 4];
            for (int i = 0; i < rows * cols; i++) BitConverter.TryWriteBytes(data.AsSpan(i * 4), (float)(rng.NextDouble() - 0.5));
            return new AdapterTensor(name, SafetensorsDtype.F32, [rows, cols], data);
        }
        var tensors = new List<AdapterTensor>();
        for (int l = 0; l < 2; l++)
            for (int e = 0; e < experts; e++)
            {
                string p = $"base_model.model.model.layers.{l}.mlp.experts.{e}";
                tensors.Add(T($"{p}.gate_proj.lora_A.weight", r, hidden)); tensors.Add(T($"{p}.gate_proj.lora_B.weight", inter, r));
                if (withUp) { tensors.Add(T($"{p}.up_proj.lora_A.weight", r, hidden)); tensors.Add(T($"{p}.up_proj.lora_B.weight", inter, r)); }
                if (withDown) { tensors.Add(T($"{p}.down_proj.lora_A.weight", r, inter)); tensors.Add(T($"{p}.down_proj.lora_B.weight", hidden, r)); }
            }
        var cfg = new JsonObject
        {
            ["peft_type"] = "LORA", ["peft_version"] = "0.17.1", ["r"] = r, ["lora_alpha"] = 2 * r,
            ["target_modules"] = new JsonArray(withUp ? ["gate_proj", "up_proj", "down_proj"] : ["gate_proj", "down_proj"]),
        };
        return new AdapterFolder(cfg, tensors.OrderBy(t => t.Name, StringComparer.Ordinal).ToList());
    }

    [Fact]
    public void PerExpertWithOwnGateAndUpFactorsFusesAsPeftDoes_StackedAAndBlockDiagonalB()
    {
        var per = PerExpert(experts: 3, r: 2, hidden: 5, inter: 4);
        var fused = AdapterConvert.Convert(per, "peft-v5");
        var gateUpA = fused.Tensors.Single(t => t.Name == "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight");
        var gateUpB = fused.Tensors.Single(t => t.Name == "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight");
        Assert.Equal(new long[] { 2 * 2 * 3, 5 }, gateUpA.Shape);
        Assert.Equal(new long[] { 2 * 4, 2 * 2 * 3 }, gateUpB.Shape);
        Assert.Equal(4, ((JsonObject)fused.Config["rank_pattern"]!)["experts.gate_up_proj"]!.GetValue<int>());
        Assert.Equal(8, ((JsonObject)fused.Config["alpha_pattern"]!)["experts.gate_up_proj"]!.GetValue<double>());
        SameDelta(per, fused);
        SameDelta(per, AdapterConvert.Convert(fused, "per-expert"));
        SameDelta(per, AdapterConvert.Convert(fused, "vllm"));
    }

    [Fact]
    public void HalfAFusedPairIsRefusedAndFlagged()
    {
        var half = PerExpert(experts: 2, r: 2, hidden: 4, inter: 3, withUp: false);
        var ex = Assert.Throws<UserInputException>(() => AdapterConvert.Convert(half, "peft-v5"));
        Assert.Contains("gate_up_proj needs both halves", ex.Message);
        var traps = AdapterInspector.Inspect(half).Traps;
        Assert.Contains(traps, t => t.StartsWith("one half of a fused pair") && t.Contains("adapts gate_proj but not up_proj"));
        Assert.Contains(traps, t => t.StartsWith("one half of a fused pair: target_modules"));
        Assert.Contains(traps, t => t.StartsWith("vLLM would drop"));
        Assert.DoesNotContain(AdapterInspector.Inspect(PerExpert(2, 2, 4, 3)).Traps, t => t.StartsWith("one half") || t.StartsWith("vLLM"));
    }

    [Fact]
    public void InspectNamesLayoutsAndTraps()
    {
        var fused = AdapterInspector.Inspect(Fixture("mixtral"));
        Assert.StartsWith("peft-v5 fused", fused.Layout);
        Assert.Equal(2, fused.ByLocation["routed"] / 3);
        Assert.Equal(12, fused.ByLocation["attention"]);
        Assert.DoesNotContain(fused.Traps, t => t.StartsWith("no routed-expert"));
        var gu = fused.Pairs.First(p => p.Parameter == "gate_up_proj");
        Assert.Equal(("model.layers.0.mlp.experts", 1, 4), (gu.Module, gu.Depth, gu.Experts));

        var attnOnly = AdapterInspector.Inspect(Fixture("mixtral", "seed_targets"));
        Assert.Contains(attnOnly.Traps, t => t.StartsWith("no routed-expert adapter"));
        Assert.StartsWith("no expert LoRA", attnOnly.Layout);

        Assert.StartsWith("per-expert", AdapterInspector.Inspect(PerExpert(2, 2, 4, 3)).Layout);

        // The model check: a v5 model has no per-expert modules, so every per-expert key is one it would not load.
        var modules = new HashSet<string> { "model.layers.0.mlp.experts", "model.layers.1.mlp.experts" };
        var parameters = new HashSet<string> { "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj" };
        var notLoaded = AdapterInspector.Inspect(PerExpert(2, 2, 4, 3), modules, parameters).Traps.Count(t => t.StartsWith("the model would not load"));
        Assert.Equal(2 * 2 * 3, notLoaded);
        var fusedFixture = Fixture("mixtral");
        var check = AdapterInspector.Inspect(fusedFixture, modules, parameters).Traps.Where(t => t.StartsWith("the model would not load")).ToList();
        Assert.Contains(check, t => t.Contains("layers.1.mlp.experts.gate_up_proj"));
        Assert.DoesNotContain(check, t => t.Contains("layers.0.mlp.experts.gate_up_proj"));
    }

    [Fact]
    public void SwappedOrientationOfPeft0190IsFlagged()
    {
        // PEFT 0.19.0 read gate_up (E, 2I, H) as in=2I, out=H: lora_A (r·E, 2I), lora_B (H, r·E); down as in=H, out=I.
        int e = 2, r = 2, h = 4, i = 3;
        AdapterTensor Z(string n, long a, long b) => new(n, SafetensorsDtype.F32, [a, b], new byte[a * b * 4]);
        const string p = "base_model.model.model.layers.0.mlp.experts";
        var tensors = new List<AdapterTensor>
        {
            Z($"{p}.base_layer.lora_A.weight", r * e, 2 * i), Z($"{p}.base_layer.lora_B.weight", h, r * e),
            Z($"{p}.lora_A.weight", r * e, h), Z($"{p}.lora_B.weight", i, r * e),
        };
        var cfg = new JsonObject
        {
            ["peft_type"] = "LORA", ["peft_version"] = "0.21.0", ["r"] = r, ["lora_alpha"] = r,
            ["target_parameters"] = new JsonArray("experts.gate_up_proj", "experts.down_proj"),
        };
        var swapped = AdapterInspector.Inspect(new AdapterFolder(cfg, tensors));
        Assert.Contains(swapped.Traps, t => t.StartsWith("swapped 3-D orientation"));
        Assert.DoesNotContain(AdapterInspector.Inspect(Fixture("qwen3_moe")).Traps, t => t.StartsWith("swapped"));
    }

    [Fact]
    public void BadInputsAreOneLineUserErrors()
    {
        string dir = Path.Combine(Path.GetTempPath(), "moelora-bad-" + Guid.NewGuid().ToString("N"));
        Directory.CreateDirectory(dir);
        try
        {
            Assert.Contains("holds no adapter_config.json", Assert.Throws<UserInputException>(() => AdapterFolder.Read(dir)).Message);
            File.WriteAllText(Path.Combine(dir, "adapter_config.json"), "{\"peft_type\": \"LORA\", \"r\": 2}");
            File.WriteAllBytes(Path.Combine(dir, "adapter_model.safetensors"), [1, 2, 3]);
            Assert.Throws<SafetensorsFormatException>(() => AdapterFolder.Read(dir));
            Assert.Contains("--to 'x'", Assert.Throws<UserInputException>(() => AdapterConvert.Convert(Fixture("mixtral"), "x")).Message);
            Assert.Contains("no per-expert LoRA", Assert.Throws<UserInputException>(() => AdapterConvert.Convert(Fixture("mixtral", "seed_targets"), "peft-v5")).Message);
        }
        finally { Directory.Delete(dir, true); }
    }
}
