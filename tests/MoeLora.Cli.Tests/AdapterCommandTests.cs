using System.Text.Json.Nodes;
using MoeLora.Cli.Infrastructure;

namespace MoeLora.Cli.Tests;

/// <summary>adapter inspect / convert and merge's self-check, end to end on the hf-tiny fixtures.</summary>
[Collection("cli")]
public sealed class AdapterCommandTests : IDisposable
{
    static string Fixture(string model) => Path.Combine(AppContext.BaseDirectory, "Data", "hf-tiny", model);
    readonly string _tmp = Directory.CreateTempSubdirectory("moelora-adapter-").FullName;
    public void Dispose() => Directory.Delete(_tmp, recursive: true);

    static (int Code, string Error) Run(params string[] args) => InProcessCli.Run(args);

    [Fact]
    public void InspectConvertAndInspectAgain()
    {
        string json = Path.Combine(_tmp, "i.json");
        var (code, err) = Run("adapter", "inspect", Path.Combine(Fixture("deepseek_v3"), "attn_plus_experts"), "--model", Path.Combine(Fixture("deepseek_v3"), "model"), "--format", "json", "-o", json);
        Assert.True(code == 0, err);
        var doc = JsonNode.Parse(File.ReadAllText(json))!;
        Assert.StartsWith("peft-v5 fused", doc["layout"]!.GetValue<string>());
        Assert.DoesNotContain(doc["traps"]!.AsArray(), t => t!.GetValue<string>().StartsWith("the model would not load"));

        string vllm = Path.Combine(_tmp, "vllm");
        (code, err) = Run("adapter", "convert", Path.Combine(Fixture("deepseek_v3"), "attn_plus_experts"), "--to", "vllm", "-o", vllm);
        Assert.True(code == 0, err);
        (code, err) = Run("adapter", "inspect", vllm, "--model", Path.Combine(Fixture("deepseek_v3"), "model"), "--format", "json", "-o", json);
        Assert.True(code == 0, err);
        doc = JsonNode.Parse(File.ReadAllText(json))!;
        Assert.StartsWith("per-expert", doc["layout"]!.GetValue<string>());
        // A transformers-v5 model has no per-expert modules: PEFT would not load these keys into it directly.
        Assert.Contains(doc["traps"]!.AsArray(), t => t!.GetValue<string>().StartsWith("the model would not load"));

        (code, err) = Run("adapter", "convert", Path.Combine(Fixture("deepseek_v3"), "attn_plus_experts"), "--to", "vllm", "-o", vllm);
        Assert.Equal(1, code);
        Assert.Contains("not empty", err);
        (code, err) = Run("adapter", "convert", vllm, "--to", "sglang", "-o", Path.Combine(_tmp, "s"));
        Assert.True(code == 0, err);
        (code, err) = Run("adapter", "convert", vllm, "--to", "yaml", "-o", Path.Combine(_tmp, "y"));
        Assert.Equal(2, code);
    }

    [Fact]
    public void GptOssConvertsWithItsInterleavedGateAndUp_AndUnknownModelsAskForModel()
    {
        string src = Path.Combine(Fixture("gpt_oss"), "attn_plus_experts");
        string per = Path.Combine(_tmp, "per");
        var (code, err) = Run("adapter", "convert", src, "--to", "per-expert", "-o", per, "--model", Path.Combine(Fixture("gpt_oss"), "model"));
        Assert.True(code == 0, err);
        var folder = MoeLora.Sources.Adapters.AdapterFolder.Read(per);
        Assert.Contains(folder.Tensors, t => t.Name == "base_model.model.model.layers.0.mlp.experts.0.gate_proj.lora_B.weight" && t.Shape[0] == 64);

        // vLLM's gpt-oss class reads PEFT's fused layout (is_3d_moe_weight): back to it, byte for byte.
        string vllm = Path.Combine(_tmp, "vllm");
        (code, err) = Run("adapter", "convert", per, "--to", "vllm", "-o", vllm);
        Assert.True(code == 0, err);
        Assert.Equal(File.ReadAllBytes(Path.Combine(src, "adapter_model.safetensors")), File.ReadAllBytes(Path.Combine(vllm, "adapter_model.safetensors")));

        // An adapter whose config does not name its model: the gate/up order cannot be guessed.
        var cfg = JsonNode.Parse(File.ReadAllText(Path.Combine(per, "adapter_config.json")))!.AsObject();
        cfg.Remove("auto_mapping");
        File.WriteAllText(Path.Combine(per, "adapter_config.json"), cfg.ToJsonString());
        (code, err) = Run("adapter", "convert", per, "--to", "peft-v5", "-o", Path.Combine(_tmp, "back"));
        Assert.Equal(1, code);
        Assert.Contains("pass --model", err);
        Assert.DoesNotContain("\n", err.TrimEnd());
    }

    [Fact]
    public void MergeRefusesAnAdapterThatLeavesATensorUnchanged()
    {
        // init_lora_weights=True saves lora_B = 0: every ΔW is zero, which a merge must not pass off as done.
        string adapter = Path.Combine(_tmp, "zero");
        Directory.CreateDirectory(adapter);
        var src = Path.Combine(Fixture("mixtral"), "attn_plus_experts");
        File.Copy(Path.Combine(src, "adapter_config.json"), Path.Combine(adapter, "adapter_config.json"));
        var folder = MoeLora.Sources.Adapters.AdapterFolder.Read(src);
        var zeroed = folder.Tensors.Select(t => t.Name.Contains("lora_B") ? t with { Data = new byte[t.Data.Length] } : t).ToList();
        File.WriteAllBytes(Path.Combine(adapter, "adapter_model.safetensors"), MoeLora.Sources.Adapters.AdapterFolder.Serialize(zeroed));
        string output = Path.Combine(_tmp, "merged");
        var (code, err) = Run("merge", Path.Combine(Fixture("mixtral"), "model"), "--adapter", adapter, "-o", output);
        Assert.Equal(1, code);
        Assert.Contains("unchanged", err);
        Assert.False(Directory.Exists(output) && Directory.EnumerateFileSystemEntries(output).Any());

        (code, err) = Run("merge", Path.Combine(Fixture("mixtral"), "model"), "--adapter", src, "-o", output);
        Assert.True(code == 0, err);
    }
}
