using System.Diagnostics;
using System.Text;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using MoeLora.Cli.Infrastructure;
using SkiaSharp;
using Xunit.Abstractions;
using YamlDotNet.Core;
using YamlDotNet.RepresentationModel;

namespace MoeLora.Cli.Tests;

/// <summary>End-to-end: the real CLI (Program.Main, in process) for plan, diff and the HTML report.</summary>
[Collection("cli")]
public sealed class PlanDiffHtmlTests : IDisposable
{
    private readonly ITestOutputHelper _output;
    private readonly string _dir = Path.Combine(Path.GetTempPath(), "moelora-cli-" + Guid.NewGuid().ToString("N"));

    public PlanDiffHtmlTests(ITestOutputHelper output)
    {
        _output = output;
        Environment.SetEnvironmentVariable("HF_HUB_OFFLINE", "1"); // the embedded catalog answers, no network
        Directory.CreateDirectory(_dir);
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private (int Code, string Stdout) Run(params string[] args)
    {
        var saved = Consoles.Out;
        var (console, buffer) = Consoles.Plain(200);
        Consoles.Out = console;
        try
        {
            var code = Program.Main(args);
            return (code, buffer.ToString());
        }
        finally
        {
            Consoles.Out = saved;
        }
    }

    private static YamlMappingNode Yaml(string path)
    {
        var stream = new YamlStream();
        stream.Load(new StringReader(File.ReadAllText(path)));
        return (YamlMappingNode)stream.Documents[0].RootNode;
    }

    private static string Scalar(YamlMappingNode map, string key) => ((YamlScalarNode)map.Children[new YamlScalarNode(key)]).Value!;

    [Theory]
    [InlineData("ddp", 1, "NO", 0)]
    [InlineData("ddp", 2, "MULTI_GPU", 0)]
    [InlineData("zero2", 4, "DEEPSPEED", 2)]
    [InlineData("zero3", 8, "DEEPSPEED", 3)]
    [InlineData("fsdp", 8, "FSDP", 3)]
    public void Plan_writes_files_that_parse_with_the_required_keys(string sharding, int gpus, string distributed, int stage)
    {
        var outDir = Path.Combine(_dir, "plan");
        var (code, stdout) = Run("plan", "Qwen/Qwen3-30B-A3B", "--gpus", gpus.ToString(), "--sharding", sharding, "--batch-size", "2",
            "--seq-length", "1024", "--gradient-checkpointing", "--output", outDir);
        Assert.Equal(0, code);
        Assert.Contains("wrote", stdout);

        // accelerate: the keys accelerate's ClusterConfig requires (compute_environment, distributed_type,
        // mixed_precision, num_processes, num_machines, machine_rank, use_cpu) with valid enum values.
        var acc = Yaml(Path.Combine(outDir, "accelerate_config.yaml"));
        Assert.Equal("LOCAL_MACHINE", Scalar(acc, "compute_environment"));
        Assert.Equal(distributed, Scalar(acc, "distributed_type"));
        // accelerate reads the file with PyYAML (YAML 1.1), where a bare NO or no is the boolean false.
        foreach (var key in new[] { "distributed_type", "mixed_precision" })
            Assert.NotEqual(ScalarStyle.Plain, ((YamlScalarNode)acc.Children[new YamlScalarNode(key)]).Style);
        Assert.Contains(Scalar(acc, "mixed_precision"), new[] { "no", "fp16", "bf16", "fp8" });
        Assert.Equal(gpus.ToString(), Scalar(acc, "num_processes"));
        Assert.Equal("1", Scalar(acc, "num_machines"));
        Assert.Equal("0", Scalar(acc, "machine_rank"));
        Assert.Equal("false", Scalar(acc, "use_cpu"));
        if (distributed == "DEEPSPEED")
        {
            var ds = (YamlMappingNode)acc.Children[new YamlScalarNode("deepspeed_config")];
            Assert.Equal("deepspeed_config.json", Scalar(ds, "deepspeed_config_file"));
            // accelerate refuses zero_stage/offload keys next to deepspeed_config_file.
            Assert.DoesNotContain(ds.Children.Keys, k => ((YamlScalarNode)k).Value is "zero_stage" or "gradient_accumulation_steps" or "gradient_clipping");
        }
        if (distributed == "FSDP")
        {
            var fsdp = (YamlMappingNode)acc.Children[new YamlScalarNode("fsdp_config")];
            Assert.Equal("Qwen3MoeDecoderLayer", Scalar(fsdp, "fsdp_transformer_layer_cls_to_wrap"));
            Assert.Equal("TRANSFORMER_BASED_WRAP", Scalar(fsdp, "fsdp_auto_wrap_policy"));
            // Measured on torch 2.11: FSDP2 with accelerate's bf16 mixed precision reduces the fp32 adapter
            // gradients in bf16 and fails; the weights already load in bf16, so the plan asks for none.
            Assert.Equal("no", Scalar(acc, "mixed_precision"));
        }
        else Assert.Equal("bf16", Scalar(acc, "mixed_precision"));

        // DeepSpeed config-json: batch arithmetic train_batch_size = micro × accumulation × world size, stage 0..3.
        var dsJson = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "deepspeed_config.json")))!.AsObject();
        Assert.Equal(2, dsJson["train_micro_batch_size_per_gpu"]!.GetValue<int>());
        Assert.Equal(2 * gpus * dsJson["gradient_accumulation_steps"]!.GetValue<int>(), dsJson["train_batch_size"]!.GetValue<int>());
        Assert.Equal(stage, dsJson["zero_optimization"]!["stage"]!.GetValue<int>());
        Assert.True(dsJson["bf16"]!["enabled"]!.GetValue<bool>());
        Assert.False(dsJson["fp16"]!["enabled"]!.GetValue<bool>());
        var allowedTop = new HashSet<string> { "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "gradient_clipping",
            "bf16", "fp16", "zero_optimization", "activation_checkpointing", "wall_clock_breakdown" };
        Assert.All(dsJson.Select(kv => kv.Key), k => Assert.Contains(k, allowedTop));

        // PEFT adapter_config.json: LoraConfig fields, the analysed targets.
        var peft = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "adapter_config.json")))!.AsObject();
        // A config to start training from: inference_mode true would make get_peft_model freeze the adapters.
        Assert.False(peft["inference_mode"]!.GetValue<bool>());
        Assert.Equal("LORA", peft["peft_type"]!.GetValue<string>());
        Assert.Equal("CAUSAL_LM", peft["task_type"]!.GetValue<string>());
        Assert.Equal(16, peft["r"]!.GetValue<int>());
        Assert.Equal("Qwen/Qwen3-30B-A3B", peft["base_model_name_or_path"]!.GetValue<string>());
        Assert.NotNull(peft["target_modules"]);

        var summary = JsonNode.Parse(File.ReadAllText(Path.Combine(outDir, "moelora_plan.json")))!.AsObject();
        Assert.True(summary["memory"]!["per_gpu_bytes"]!.GetValue<long>() > 0);
        Assert.Equal(TrainingTermsSum(summary["memory"]!), summary["memory"]!["per_gpu_bytes"]!.GetValue<long>());
    }

    private static long TrainingTermsSum(JsonNode memory) => memory["terms"]!.AsObject().Sum(kv => kv.Value!.GetValue<long>());

    [Fact]
    public void Plan_that_does_not_fit_writes_nothing_and_exits_non_zero()
    {
        var outDir = Path.Combine(_dir, "plan-too-big");
        var (code, _) = Run("plan", "Qwen/Qwen3-30B-A3B", "--gpus", "1", "--sharding", "ddp", "--batch-size", "64", "--seq-length", "8192", "--output", outDir);
        Assert.NotEqual(0, code);
        Assert.False(Directory.Exists(outDir) && Directory.EnumerateFiles(outDir).Any(), "launch files were written for a setup that does not fit");
    }

    [Fact]
    public void Plan_without_output_is_a_usage_error()
    {
        var (code, _) = Run("plan", "Qwen/Qwen3-30B-A3B");
        Assert.NotEqual(0, code);
    }

    [Fact]
    public void Diff_moe_vs_dense_reproduces_section_6_from_real_analysis()
    {
        var file = Path.Combine(_dir, "diff.json");
        var (code, _) = Run("diff", "meta-llama/Llama-4-Scout-17B-16E-Instruct", "meta-llama/Meta-Llama-3.1-8B", "--format", "json", "-o", file);
        Assert.Equal(0, code);
        var json = JsonNode.Parse(File.ReadAllText(file))!.AsObject();
        var rows = json["rows"]!.AsArray().ToDictionary(r => r!["aspect"]!.GetValue<string>(), r => (A: r!["a"]!.GetValue<string>(), B: r["b"]!.GetValue<string>()));
        foreach (var aspect in new[] { "target_modules", "adapter_instances", "lora_parameters", "expert_isolation", "hidden_states", "training_per_gpu", "gradient_flow" })
            Assert.True(rows.ContainsKey(aspect), aspect);
        // Seed: "Target modules 2,496 vs 224" — the real v5 analysis: routed experts are fused, so target_modules
        // reach attention, shared experts and dense MLPs only; the dense side matches the seed's 224.
        Assert.StartsWith("224 adapted", rows["target_modules"].B);
        Assert.Equal("N/A (dense: no experts)", rows["expert_isolation"].B);
        Assert.Contains("post-routing", rows["hidden_states"].A);
        Assert.Contains("router frozen", rows["gradient_flow"].A);
        _output.WriteLine(string.Join("\n", rows.Select(kv => $"{kv.Key}: {kv.Value.A} | {kv.Value.B}")));
    }

    [Fact]
    public void Diff_two_lora_configs_on_one_model()
    {
        var a = Path.Combine(_dir, "a.json");
        var b = Path.Combine(_dir, "b.json");
        File.WriteAllText(a, """{"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}""");
        File.WriteAllText(b, """{"r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}""");
        var (code, stdout) = Run("diff", "mistralai/Mixtral-8x7B-v0.1", "--lora-config", a, "--lora-config-b", b, "--format", "markdown");
        Assert.Equal(0, code);
        Assert.Contains("| Expert isolation |", stdout);
        Assert.Contains("each of 8 experts has its own LoRA slice", stdout);
        Assert.Contains("only the top-2 of 8 experts", stdout);
    }

    private string Html(params string[] extra)
    {
        var file = Path.Combine(_dir, "report.html");
        var (code, _) = Run(["report", "mistralai/Mixtral-8x7B-v0.1", "--format", "html", "-o", file, .. extra]);
        Assert.Equal(0, code);
        return file;
    }

    [Fact]
    public void Html_report_is_self_contained_with_three_charts_and_every_section()
    {
        var html = File.ReadAllText(Html("--seq-length", "4096", "-t", "q_proj,w1,w2,w3"));
        foreach (var id in new[] { "model", "matching", "adapters", "training-memory", "hidden-states", "recommendations", "chart-memory", "chart-adapters", "chart-layers" })
            Assert.Contains($"id=\"{id}\"", html);
        var images = Regex.Matches(html, "src=\"data:image/svg\\+xml;base64,([A-Za-z0-9+/=]+)\"");
        Assert.Equal(3, images.Count);
        foreach (Match m in images)
        {
            var svg = Encoding.UTF8.GetString(Convert.FromBase64String(m.Groups[1].Value));
            Assert.Contains("<svg", svg);
            Assert.Contains("<rect", svg); // bars were drawn
        }
        Assert.DoesNotContain("src=\"http", html); // nothing fetched from outside
        Assert.DoesNotContain("<script", html);
        Assert.Contains("does not fit", html);
        // What the JSON tells a user is in the HTML too: routing, the matching rows' notes, sharing and memory lines.
        foreach (var fact in new[] { "<th>Routing</th>", "rewritten by PEFT onto", "<th>Sharing</th>", "<th>Adapter memory</th>", "<th>Experts with adapters</th>",
                     System.Net.WebUtility.HtmlEncode("<th>Batch × seq × hidden</th>").Replace("&lt;", "<").Replace("&gt;", ">") })
            Assert.Contains(fact, html);
    }

    [SkippableFact]
    public void Html_charts_render_in_headless_chromium()
    {
        var chromium = new[] { "chromium", "chromium-browser", "google-chrome" }
            .Select(n => Environment.GetEnvironmentVariable("PATH")!.Split(':').Select(p => Path.Combine(p, n)).FirstOrDefault(File.Exists))
            .FirstOrDefault(p => p is not null);
        Skip.If(chromium is null, "chromium is not installed (apt-get install -y chromium); the README documents the manual screenshot check");
        var file = Html();
        var png = Path.Combine(_dir, "shot.png");
        var psi = new ProcessStartInfo(chromium!, ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1200,3200", $"--screenshot={png}", "file://" + file])
        { RedirectStandardError = true, RedirectStandardOutput = true };
        using var p = Process.Start(psi)!;
        Assert.True(p.WaitForExit(60_000), "chromium did not finish in 60 s");
        Assert.True(File.Exists(png), "no screenshot");
        using var bitmap = SKBitmap.Decode(png);
        // Category10 blue (31, 119, 180) fills the bars of every chart: count those pixels.
        var blue = 0;
        for (var y = 0; y < bitmap.Height; y += 2)
            for (var x = 0; x < bitmap.Width; x += 2)
            {
                var c = bitmap.GetPixel(x, y);
                if (Math.Abs(c.Red - 31) < 12 && Math.Abs(c.Green - 119) < 12 && Math.Abs(c.Blue - 180) < 12) blue++;
            }
        _output.WriteLine($"{blue} sampled chart-blue pixels in a {bitmap.Width}x{bitmap.Height} screenshot");
        Assert.True(blue > 5_000, $"charts did not render ({blue} blue pixels)");
    }
}
