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
        Assert.Equal(2, code);
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
