using System.Text.Json.Nodes;
using MoeLora.Core;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
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

    /// <summary>The fixture model's expert layout, from its config.json as `--model` would read it.</summary>
    private static ExpertLayout Layout(string model)
    {
        string path = Path.Combine(AppContext.BaseDirectory, "Data", "hf-tiny", model, "model", "config.json");
        var spec = ArchitectureRegistry.Build(ModelConfig.Parse(File.ReadAllText(path), path), MoeLora.Core.Modules.Layout.V5);
        return ExpertLayout.FromSpec(spec, model);
    }

    private static readonly ExpertLayout Halves = ExpertLayout.Generic(GateUpOrder.Halves);

    private static void SameDelta(AdapterFolder x, AdapterFolder y, ExpertLayout layout)
    {
        var dx = AdapterDelta.PerExpert(x, layout);
        var dy = AdapterDelta.PerExpert(y, layout);
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
        var layout = Layout(model);
        var per = AdapterConvert.Convert(fused, "per-expert", layout);
        string owner = LoraPairs.Read(fused).Pairs.First(p => p.Parameter == "gate_up_proj").Module;
        Assert.Contains(per.Tensors, t => t.Name == $"{LoraPairs.Prefix}{layout.ExpertModule(owner, 0, ExpertRole.Gate)}.lora_A.weight");
        Assert.DoesNotContain(per.Tensors, t => t.Name.Contains("base_layer"));
        SameDelta(fused, per, layout);
        // Without a layout the adapter's own config names the model (PEFT's auto_mapping): the same result.
        var byConfig = AdapterConvert.Convert(fused, "per-expert", null);
        Assert.Equal(per.Tensors.Select(t => t.Name), byConfig.Tensors.Select(t => t.Name));
        Assert.All(per.Tensors.Zip(byConfig.Tensors), x => Assert.True(x.First.Data.AsSpan().SequenceEqual(x.Second.Data), x.First.Name));
        var back = AdapterConvert.Convert(per, "peft-v5", layout);
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
        var layout = Layout(model);
        if (model == "llama4_text")
        {
            // PEFT stores Llama 4's expert LoRA transposed to the layout vLLM's fused MoE loader reshapes.
            Assert.Contains("transposed", Assert.Throws<UserInputException>(() => AdapterConvert.Convert(fused, "vllm", layout)).Message);
            return;
        }
        var vllm = AdapterConvert.Convert(fused, "vllm", layout);
        SameDelta(fused, vllm, layout);
        int r = LoraPairs.Int(vllm.Config, "r", -1);
        Assert.All(LoraPairs.Read(vllm).Pairs, p => Assert.Equal(r, p.Rank));
        Assert.Empty((JsonObject)vllm.Config["rank_pattern"]!);
        var inspection = AdapterInspector.Inspect(vllm, expertLayout: layout);
        // gpt-oss and Llama 4 checkpoints keep their experts fused, and vLLM's classes for them read PEFT's fused
        // layout (is_3d_moe_weight); the others get the per-expert keys of their checkpoints.
        if (model == "gpt_oss") Assert.StartsWith("peft-v5 fused", inspection.Layout);
        else Assert.StartsWith("per-expert", inspection.Layout);
        if (model == "mixtral") Assert.Contains(vllm.Tensors, t => t.Name.Contains(".block_sparse_moe.experts.0.w1.lora_A"));
        Assert.DoesNotContain(inspection.Traps, t => t.StartsWith("vLLM"));
    }

    /// <summary>
    /// PEFT 0.21 on the device loaded every per-expert conversion with the original ΔW except qwen2_moe's: its type has
    /// no entry in PEFT's MoE conversion table, so the per-expert keys came back unexpected. Inspect flags exactly the
    /// types without a rule (from Core's copy of PEFT's table, not from this list).
    /// </summary>
    [Theory, MemberData(nameof(Fused))]
    public void InspectFlagsPerExpertAdaptersPeftDoesNotConvert(string model)
    {
        var layout = Layout(model);
        if (model is "gpt_oss" or "llama4_text") return; // experts stored fused: no per-expert form exists
        var perExpert = AdapterConvert.Convert(Fixture(model), "per-expert", layout);
        var trap = AdapterInspector.Inspect(perExpert, expertLayout: layout).Traps.Where(t => t.StartsWith("per-expert adapter that PEFT")).ToList();
        bool converts = MoeLora.Core.Peft.PeftModelTables.ConversionRules(model) is not null;
        Assert.Equal(converts, layout.PeftConvertsPerExpert);
        Assert.Equal(converts ? 0 : 1, trap.Count);
        if (model == "qwen2_moe") Assert.Contains("qwen2_moe", trap[0]);
        // The fused form never gets the trap.
        Assert.DoesNotContain(AdapterInspector.Inspect(Fixture(model), expertLayout: layout).Traps, t => t.StartsWith("per-expert adapter that PEFT"));
    }

    [Theory, MemberData(nameof(Fused))]
    public void SglangFormatIsPerExpertWithOneRank_OrRefusedForExpertsStoredFused(string model)
    {
        var fused = Fixture(model);
        var layout = Layout(model);
        if (model is "gpt_oss" or "llama4_text")
        {
            Assert.Contains("stored fused", Assert.Throws<UserInputException>(() => AdapterConvert.Convert(fused, "sglang", layout)).Message);
            return;
        }
        var sglang = AdapterConvert.Convert(fused, "sglang", layout);
        SameDelta(fused, sglang, layout);
        int r = LoraPairs.Int(sglang.Config, "r", -1);
        Assert.All(LoraPairs.Read(sglang).Pairs, p => Assert.Equal(r, p.Rank));
        Assert.StartsWith("per-expert", AdapterInspector.Inspect(sglang, expertLayout: layout).Layout);
    }

    // ΔW of expert e of a fused ParamWrapper pair, written out from PEFT's definition (peft-semantics §2.3):
    // A.reshape(E, r, in), B.reshape(out, r, E), ΔW_e = Σ_k B[:, k·E + e] A[e·r + k, :] · scaling.
    private static double[,] FusedDelta(LoraPair p, int e)
    {
        double[] a = AdapterDelta.Floats(p.A), b = AdapterDelta.Floats(p.B);
        long inF = p.A.Shape[1], outF = p.B.Shape[0], cols = p.B.Shape[1];
        var d = new double[outF, inF];
        for (long o = 0; o < outF; o++)
            for (long i = 0; i < inF; i++)
            {
                double sum = 0;
                for (int k = 0; k < p.Rank; k++) sum += b[o * cols + (long)k * p.Experts + e] * a[((long)e * p.Rank + k) * inF + i];
                d[o, i] = sum * p.Alpha / p.Rank;
            }
        return d;
    }

    private static double[,] Transposed(double[,] d)
    {
        var t = new double[d.GetLength(1), d.GetLength(0)];
        for (int i = 0; i < d.GetLength(0); i++) for (int j = 0; j < d.GetLength(1); j++) t[j, i] = d[i, j];
        return t;
    }

    private static double[,] PerExpertDelta(AdapterFolder folder, string module)
    {
        var p = LoraPairs.Read(folder).Pairs.Single(x => x.Module == module);
        Assert.Equal(1, p.Experts);
        return FusedDelta(p, 0);
    }

    [Theory, MemberData(nameof(Fused))]
    public void GateAndUpAreTheFeaturesTheModelUsesAsGateAndUp(string model)
    {
        // transformers 5.17: GptOssExperts splits gate_up as gate = [..., ::2], up = [..., 1::2]; every other family
        // concatenates gate then up. The split must follow the model, or a gpt-oss "gate" LoRA would be half gate, half up.
        // Llama 4 computes x @ gate_up_proj[e] with (E, hidden, 2·I) and no is_transposed, so PEFT 0.21's ΔW_e is
        // (hidden, 2·I): its gate and up features are columns, and a per-expert (out, in) LoRA is the transpose.
        bool interleaved = model == "gpt_oss", columns = model == "llama4_text";
        var layout = Layout(model);
        Assert.Equal(interleaved ? GateUpOrder.Interleaved : GateUpOrder.Halves, layout.Order);
        var fused = Fixture(model);
        var gu = LoraPairs.Read(fused).Pairs.First(p => p.Parameter == "gate_up_proj");
        var per = AdapterConvert.Convert(fused, "per-expert", layout);
        for (int e = 0; e < gu.Experts; e++)
        {
            var full = FusedDelta(gu, e);
            if (columns) full = Transposed(full);
            long inter = full.GetLength(0) / 2;
            var gate = PerExpertDelta(per, layout.ExpertModule(gu.Module, e, ExpertRole.Gate));
            var up = PerExpertDelta(per, layout.ExpertModule(gu.Module, e, ExpertRole.Up));
            for (long j = 0; j < inter; j++)
                for (int i = 0; i < full.GetLength(1); i++)
                {
                    long g = interleaved ? 2 * j : j, u = interleaved ? 2 * j + 1 : inter + j;
                    Assert.True(full[g, i] == gate[j, i], $"{model} expert {e} gate feature {j}");
                    Assert.True(full[u, i] == up[j, i], $"{model} expert {e} up feature {j}");
                }
        }
    }

    [Fact]
    public void OwnGateAndUpFactorsFuseIntoTheModelsOrder_BlockDiagonalRowsInterleavedForGptOss()
    {
        // gpt-oss has no per-expert checkpoint form; a per-expert adapter with its own gate and up A (e.g. trained
        // elsewhere) must land gate rows on even and up rows on odd gate_up features.
        var layout = Layout("gpt_oss");
        var fusedFixture = Fixture("gpt_oss");
        var per = AdapterConvert.Convert(fusedFixture, "per-expert", layout);
        // Give up_proj its own A with the same ΔW: A·2 and B/2 are exact in binary floating point.
        var tensors = per.Tensors.Select(t =>
            !t.Name.Contains(".up_proj.") ? t
            : t with { Data = Scale(t, t.Name.Contains("lora_A") ? 2f : 0.5f) }).ToList();
        var own = new AdapterFolder(per.Config, tensors);
        var fused = AdapterConvert.Convert(own, "peft-v5", layout);
        var gu = LoraPairs.Read(fused).Pairs.First(p => p.Parameter == "gate_up_proj");
        Assert.Equal(2 * 4, gu.Rank);
        var original = LoraPairs.Read(fusedFixture).Pairs.First(p => p.Parameter == "gate_up_proj");
        for (int e = 0; e < gu.Experts; e++)
        {
            var want = FusedDelta(original, e);
            var got = FusedDelta(gu, e);
            for (int o = 0; o < want.GetLength(0); o++)
                for (int i = 0; i < want.GetLength(1); i++)
                    Assert.True(want[o, i] == got[o, i], $"expert {e} feature {o}: {got[o, i]} vs {want[o, i]}");
        }
    }

    private static byte[] Scale(AdapterTensor t, float factor)
    {
        Assert.Equal(SafetensorsDtype.F32, t.Dtype);
        var data = (byte[])t.Data.Clone();
        for (int i = 0; i < data.Length; i += 4)
            BitConverter.TryWriteBytes(data.AsSpan(i, 4), BitConverter.ToSingle(data, i) * factor);
        return data;
    }

    [Fact]
    public void WrittenFolderReadsBackIdentically()
    {
        var layout = Layout("qwen3_moe");
        var per = AdapterConvert.Convert(Fixture("qwen3_moe"), "per-expert", layout);
        string dir = Path.Combine(Path.GetTempPath(), "moelora-adapter-" + Guid.NewGuid().ToString("N"));
        try
        {
            per.Write(dir);
            var again = AdapterFolder.Read(dir);
            Assert.Equal(per.Tensors.Select(t => t.Name).Order(), again.Tensors.Select(t => t.Name));
            SameDelta(per, again, layout);
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
        Assert.Contains("pass --model", Assert.Throws<UserInputException>(() => AdapterConvert.Convert(per, "peft-v5", null)).Message);
        var fused = AdapterConvert.Convert(per, "peft-v5", Halves);
        var gateUpA = fused.Tensors.Single(t => t.Name == "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight");
        var gateUpB = fused.Tensors.Single(t => t.Name == "base_model.model.model.layers.0.mlp.experts.base_layer.lora_B.weight");
        Assert.Equal(new long[] { 2 * 2 * 3, 5 }, gateUpA.Shape);
        Assert.Equal(new long[] { 2 * 4, 2 * 2 * 3 }, gateUpB.Shape);
        Assert.Equal(4, ((JsonObject)fused.Config["rank_pattern"]!)["experts.gate_up_proj"]!.GetValue<int>());
        Assert.Equal(8, ((JsonObject)fused.Config["alpha_pattern"]!)["experts.gate_up_proj"]!.GetValue<double>());
        SameDelta(per, fused, Halves);
        SameDelta(per, AdapterConvert.Convert(fused, "per-expert", Halves), Halves);
        SameDelta(per, AdapterConvert.Convert(fused, "vllm", Halves), Halves);
        SameDelta(per, AdapterConvert.Convert(per, "vllm", Halves), Halves);
    }

    [Fact]
    public void HalfAFusedPairIsRefusedAndFlagged()
    {
        var half = PerExpert(experts: 2, r: 2, hidden: 4, inter: 3, withUp: false);
        var ex = Assert.Throws<UserInputException>(() => AdapterConvert.Convert(half, "peft-v5", Halves));
        Assert.Contains("gate_up_proj needs both halves", ex.Message);
        var traps = AdapterInspector.Inspect(half).Traps;
        Assert.Contains(traps, t => t.StartsWith("one half of a fused pair") && t.Contains("adapts gate_proj but not up_proj"));
        Assert.Contains(traps, t => t.StartsWith("one half of a fused pair: target_modules"));
        Assert.Contains(traps, t => t.StartsWith("vLLM refuses") && t.Contains("pack_moe"));
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
    public void InspectFollowsVllmsLoaderRules()
    {
        // PEFT's fused layout: vLLM reads it natively only where its model class is 3-D (gpt-oss), not for Mixtral.
        Assert.Contains(AdapterInspector.Inspect(Fixture("mixtral"), expertLayout: Layout("mixtral")).Traps, t => t.StartsWith("vLLM reads this fused 3-D"));
        Assert.DoesNotContain(AdapterInspector.Inspect(Fixture("gpt_oss"), expertLayout: Layout("gpt_oss")).Traps, t => t.StartsWith("vLLM"));
        // ...and gpt-oss per-expert keys are refused there.
        var perGptOss = AdapterConvert.Convert(Fixture("gpt_oss"), "per-expert", Layout("gpt_oss"));
        Assert.Contains(AdapterInspector.Inspect(perGptOss, expertLayout: Layout("gpt_oss")).Traps, t => t.StartsWith("vLLM refuses the per-expert keys"));
        // Our per-expert output keeps PEFT's rank_pattern for the doubled rank of a fused gate_up from own factors;
        // vLLM reads one r, so it would scale those LoRAs wrongly.
        var per = PerExpert(experts: 2, r: 2, hidden: 4, inter: 3);
        var blockDiagonal = AdapterConvert.Convert(per, "peft-v5", Halves);
        // PEFT's doubled gate_up rank and alpha keep the scaling: nothing for vLLM to mis-scale.
        Assert.DoesNotContain(AdapterInspector.Inspect(blockDiagonal).Traps, t => t.StartsWith("vLLM would mis-scale"));
        var cfg = (JsonObject)blockDiagonal.Config.DeepClone();
        cfg["alpha_pattern"] = new JsonObject { ["experts.gate_up_proj"] = 5 };
        Assert.Contains(AdapterInspector.Inspect(new AdapterFolder(cfg, blockDiagonal.Tensors)).Traps, t => t.StartsWith("vLLM would mis-scale"));
        // Keys that are not LoRA factors: skipped silently or refused, as vLLM's parser does.
        var embedBase = new AdapterTensor("base_model.model.model.embed_tokens.base_layer.weight", SafetensorsDtype.F32, [2, 2], new byte[16]);
        var saved = new AdapterTensor("base_model.model.lm_head.weight", SafetensorsDtype.F32, [2, 2], new byte[16]);
        var withOther = new AdapterFolder(per.Config, [.. per.Tensors, embedBase, saved]);
        var traps = AdapterInspector.Inspect(withOther).Traps;
        Assert.Contains(traps, t => t.StartsWith("vLLM would drop") && t.Contains("embed_tokens.base_layer"));
        Assert.Contains(traps, t => t.StartsWith("vLLM refuses base_model.model.lm_head.weight"));
        Assert.Contains("not a LoRA weight", Assert.Throws<UserInputException>(() => AdapterConvert.Convert(withOther, "vllm", Halves)).Message);
        var cfg2 = (JsonObject)per.Config.DeepClone();
        cfg2["modules_to_save"] = new JsonArray("lm_head");
        Assert.Contains(AdapterInspector.Inspect(new AdapterFolder(cfg2, per.Tensors)).Traps, t => t.Contains("modules_to_save"));
        Assert.Contains("modules_to_save", Assert.Throws<UserInputException>(() => AdapterConvert.Convert(new AdapterFolder(cfg2, per.Tensors), "vllm", Halves)).Message);
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
        foreach (var model in Fused)
            Assert.DoesNotContain(AdapterInspector.Inspect(Fixture(model)).Traps, t => t.StartsWith("swapped"));
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
            Assert.Contains("--to 'x'", Assert.Throws<UserInputException>(() => AdapterConvert.Convert(Fixture("mixtral"), "x", null)).Message);
            Assert.Contains("no per-expert LoRA", Assert.Throws<UserInputException>(() => AdapterConvert.Convert(Fixture("mixtral", "seed_targets"), "peft-v5", null)).Message);
        }
        finally { Directory.Delete(dir, true); }
    }
}
