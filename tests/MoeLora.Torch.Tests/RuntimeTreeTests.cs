using System.IO.Compression;
using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// Keeps analysis and runtime one: for every tiny config the repository holds (the Core oracle inputs, linked into
/// Data/oracle, the hf-tiny fixtures, and the hand-written configs of Data/handwritten for types the oracle does not
/// hold yet), a family with runtime settings builds a model whose
/// <c>named_parameters()</c> (names, shapes, order) equal Core's transformers-5 tree and what transformers 5.17 built
/// for that config; a family without them is refused in one line naming what is missing.
/// </summary>
public class RuntimeTreeTests
{
    public RuntimeTreeTests() => TorchRuntime.EnsureInitialized();

    static string Data(params string[] parts) => Path.Combine([AppContext.BaseDirectory, "Data", .. parts]);

    static JsonObject ReadGz(string path)
    {
        using var gz = new GZipStream(File.OpenRead(path), CompressionMode.Decompress);
        return JsonNode.Parse(gz)!.AsObject();
    }

    static readonly Lazy<Dictionary<string, (string Config, JsonArray? Params)>> Configs = new(() =>
    {
        var all = new Dictionary<string, (string, JsonArray?)>(StringComparer.Ordinal);
        foreach (var (file, tag) in new[] { ("tiny_models.json.gz", "extra"), ("moe_tiny_models.json.gz", "moe") })
            foreach (var (name, entry) in ReadGz(Data("oracle", file))["models"]!.AsObject())
                if (entry?["input_config"] is JsonObject input && entry["params"] is JsonArray ps
                    && ArchitectureRegistry.IsSupported(input["model_type"]?.GetValue<string>() ?? ""))
                    all[$"{tag}/{name}"] = (input.ToJsonString(), ps);
        foreach (var dir in Directory.GetDirectories(Data("hf-tiny")))
            all[$"hf-tiny/{Path.GetFileName(dir)}"] = (File.ReadAllText(Path.Combine(dir, "model", "config.json")), null);
        // Written by hand from the config classes (no transformers tree to compare with): Core's tree is the reference.
        foreach (var file in Directory.GetFiles(Data("handwritten"), "*.json"))
            all[$"handwritten/{Path.GetFileNameWithoutExtension(file)}"] = (File.ReadAllText(file), null);
        return all;
    });

    public static TheoryData<string> Names()
    {
        var d = new TheoryData<string>();
        foreach (var n in Configs.Value.Keys.Order(StringComparer.Ordinal)) d.Add(n);
        return d;
    }

    [Fact]
    public void EveryConfigSourceIsRead()
    {
        var names = Configs.Value.Keys.ToList();
        Assert.True(names.Count(n => n.StartsWith("extra/", StringComparison.Ordinal)) >= 28);
        Assert.True(names.Count(n => n.StartsWith("moe/", StringComparison.Ordinal)) >= 15);
        Assert.Equal(Fixtures.AllModels.Length, names.Count(n => n.StartsWith("hf-tiny/", StringComparison.Ordinal)));
        Assert.Contains("handwritten/deepseek_ocr2", names);
        Assert.Contains("handwritten/ernie4_5_vl_moe", names);
    }

    [Fact]
    public void WhichFamiliesRunIsStatedByCore()
    {
        var byType = Configs.Value.Values.Select(c => TorchModelFactory.Spec(c.Config))
            .GroupBy(s => s.ModelType).ToDictionary(g => g.Key, g => g.Any(s => s.Runtime is not null));
        string[] run = ["llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "llama4_text", "gpt_oss", "glm4_moe",
            "ernie4_5_moe", "exaone_moe", "solar_open", "dots1", "hy_v3", "mimo_v2_flash", "hunyuan_v1_moe",
            "phimoe", "granitemoe", "granitemoeshared", "granitemoe_swa", "flex_olmo", "cohere2_moe", "afmoe", "laguna", "mellum", "minimax_m2", "minimax_m3_vl_text", "aria_text", "doge",
            "qwen3_next", "qwen3_5_moe_text", "lfm2_moe", "nemotron_h", "granitemoehybrid", "deepseek_v2", "glm4_moe_lite",
            "axk1", "axk2", "deepseek_v32", "glm_moe_dsa", "zaya", "jetmoe", "dbrx", "inkling_text", "hy_v4", "jamba", "minimax", "deepseek_v4", "kimi_linear", "llama4", "aria", "minimax_m3_vl", "inkling_mm_model", "step3p7", "kimi_k25", "qwen3_vl_moe", "qwen3_omni_moe_thinker",
            // Also in Data/handwritten (written before the oracle held them).
            "deepseek_ocr2", "ernie4_5_vl_moe"];
        // mistral4 runs (MlaVariantsTests), but the oracle's tiny config rotates 24 · 0.5 dims for a rope width of 8,
        // which transformers' forward cannot run either. longcat_flash runs (MoeTypesParityTests, LongcatFlashTests),
        // but the oracle's tiny config (head_dim 24 for a rope width of 8, 2 kv heads for 4) is one transformers'
        // forward cannot run. glm4v_moe runs (MoeTypesParityTests) where its mrope sections split its rotary frequencies,
        // but the oracle's tiny config keeps the default 8/12/12 for 4 of them, which transformers' rotary embedding
        // cannot split either.
        string[] refused = ["mistral4", "longcat_flash", "glm4v_moe"];
        Assert.All(run, t => Assert.True(byType[t], $"{t} should run"));
        Assert.All(refused, t => Assert.False(byType[t], $"{t} should be refused"));
    }

    [Theory]
    [MemberData(nameof(Names))]
    public void RuntimeParametersEqualTheV5TreeOrTheRuntimeIsRefusedInOneLine(string name)
    {
        var (config, oracle) = Configs.Value[name];
        var spec = TorchModelFactory.Spec(config);
        if (spec.Runtime is null)
        {
            Assert.False(string.IsNullOrWhiteSpace(spec.RuntimeUnavailable), $"{name}: no runtime and no reason");
            var e = Assert.Throws<NotSupportedException>(() => TorchModelFactory.Random(config, 0, ScalarType.BFloat16));
            Assert.Contains(spec.RuntimeUnavailable, e.Message);
            Assert.DoesNotContain('\n', e.Message);
            return;
        }
        using var holder = new DisposableModel(TorchModelFactory.Random(config, 0, ScalarType.BFloat16));
        var runtime = holder.Model.NamedParameters().Select(p => $"{p.Name} [{string.Join(",", p.Param.shape)}]").ToList();
        var tree = spec.Tree.Parameters.Select(p => $"{p.Name} [{string.Join(",", p.Shape)}]").ToList();
        Assert.Equal(tree, runtime);
        if (oracle is not null)
            Assert.Equal(oracle.Select(p => $"{p![0]!.GetValue<string>()} [{string.Join(",", p[1]!.AsArray().Select(x => x!.GetValue<long>()))}]").ToList(), runtime);
    }

    [Theory]
    [MemberData(nameof(Names))]
    public void RuntimeModelsRunAForward(string name)
    {
        var (config, _) = Configs.Value[name];
        if (TorchModelFactory.Spec(config).Runtime is null) return;
        using var holder = new DisposableModel(TorchModelFactory.Random(config, 1));
        using var _ = no_grad();
        using var ids = arange(5, ScalarType.Int64).remainder(holder.Model.VocabSize).unsqueeze(0);
        using var o = holder.Model.Forward(ids, outputHiddenStates: true);
        Assert.Equal(new long[] { 1, 5, holder.Model.VocabSize }, o.Logits.shape);
        Assert.False(o.Logits.isnan().any().item<bool>() || o.Logits.isinf().any().item<bool>(), $"{name}: non-finite logits");
        Assert.Equal(holder.Model.NumLayers + 1, o.HiddenStates.Count);
    }
}
