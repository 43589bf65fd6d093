using System.ComponentModel;
using System.Reflection;
using System.Text.Json.Nodes;
using MoeLora.Cli.Options;
using Spectre.Console.Cli;

namespace MoeLora.Cli.Tests;

/// <summary>
/// The command line as a whole: every option's help names its default, every command that prints a result honours
/// --format (and refuses a format it does not write, listing those it does), and tables fit a 100-column terminal.
/// </summary>
[Collection("cli")] // in-process runs share the static Consoles
public sealed class CommandLineTests : IDisposable
{
    readonly string _tmp = Directory.CreateTempSubdirectory("moelora-cmdline-").FullName;

    public CommandLineTests() => Environment.SetEnvironmentVariable("HF_HUB_OFFLINE", "1");

    public void Dispose() => Directory.Delete(_tmp, recursive: true);

    static string Fixture(string model) => Path.Combine(AppContext.BaseDirectory, "Data", "hf-tiny", model);

    public static TheoryData<string> SettingsTypes()
    {
        var data = new TheoryData<string>();
        foreach (var t in typeof(Program).Assembly.GetTypes().Where(t => typeof(CommandSettings).IsAssignableFrom(t) && !t.IsAbstract))
            data.Add(t.FullName!);
        return data;
    }

    [Theory]
    [MemberData(nameof(SettingsTypes))]
    public void Every_option_help_names_its_default_or_says_it_is_required(string typeName)
    {
        var type = typeof(Program).Assembly.GetType(typeName)!;
        var missing = new List<string>();
        foreach (var p in type.GetProperties(BindingFlags.Public | BindingFlags.Instance))
        {
            var option = p.GetCustomAttribute<CommandOptionAttribute>();
            if (option is null || option.IsHidden || p.PropertyType == typeof(bool)) continue; // a flag's default is off
            var help = p.GetCustomAttribute<DescriptionAttribute>()?.Description ?? "";
            if (!help.Contains("default", StringComparison.OrdinalIgnoreCase) && !help.Contains("required", StringComparison.Ordinal))
                missing.Add($"--{string.Join("|--", option.LongNames)}: '{help}'");
        }
        Assert.True(missing.Count == 0, "help names no default: " + string.Join("; ", missing));
    }

    [Fact]
    public void Typed_option_values_are_checked_before_any_work_with_the_accepted_words()
    {
        foreach (var (args, message) in new (string[], string)[]
        {
            (["modules", "--format", "html"], "--format 'html': use text, json, markdown or md"),
            (["report", "--format", "yaml"], "--format 'yaml': use text, json, markdown, md or html"),
            (["report", "--sharding", "zero9"], "--sharding 'zero9': use ddp, zero2, zero3, fsdp or ep"),
            (["report", "--quantization", "int3"], "--quantization 'int3': use none, int8 or nf4"),
            (["report", "--gpu-memory", "lots"], "--gpu-memory 'lots': not a size"),
            (["report", "--model-dtype", "fp8"], "--model-dtype 'fp8': unknown dtype: use fp32, bf16 or fp16"),
            (["report", "--load-model", "--device", "tpu"], "--device 'tpu': use cpu, cuda or cuda:N"),
            (["train", "--device", "gpu", "--plan-only"], "--device 'gpu': use cpu, cuda or cuda:N"),
            (["train", "--model-dtype", "fp16", "--plan-only"], "--model-dtype 'fp16'"),
            (["eval", "--format", "html"], "--format 'html': use text, json, markdown or md"),
        })
        {
            var (code, _, err) = InProcessCli.RunCapturing(100, args);
            Assert.True(code == 2, $"{string.Join(' ', args)}: exit {code}, {err}");
            Assert.Contains(message, err);
            Assert.Single(err.Trim().Split('\n'));
        }
    }

    [Theory]
    [InlineData("models")]
    [InlineData("modules", "mistralai/Mixtral-8x7B-v0.1")]
    [InlineData("report", "Qwen/Qwen3-30B-A3B")]
    [InlineData("diff", "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen3-30B-A3B")]
    public void Json_and_markdown_are_what_format_asks_for(params string[] command)
    {
        var (code, json, err) = InProcessCli.RunCapturing(100, [.. command, "--format", "json"]);
        Assert.True(code == 0, err);
        Assert.IsType<JsonObject>(JsonNode.Parse(json));
        (code, var md, err) = InProcessCli.RunCapturing(100, [.. command, "--format", "md"]);
        Assert.True(code == 0, err);
        Assert.Contains("|---", md);
        Assert.DoesNotContain("─", md); // no box drawing: markdown, not the terminal table
        // -o takes the same result, and its extension chooses the format when --format is absent.
        var file = Path.Combine(_tmp, "result.json");
        (code, _, err) = InProcessCli.RunCapturing(100, [.. command, "-o", file]);
        Assert.True(code == 0, err);
        Assert.Equal(JsonNode.Parse(json)!.ToJsonString().Length, JsonNode.Parse(File.ReadAllText(file))!.ToJsonString().Length);
    }

    [Fact]
    public void Plan_prints_its_summary_in_each_format_and_never_replaces_files_silently()
    {
        var dir = Path.Combine(_tmp, "plan");
        var (code, json, err) = InProcessCli.RunCapturing(100, "plan", "Qwen/Qwen3-30B-A3B", "--gpus", "8", "--sharding", "zero3", "-o", dir, "--format", "json");
        Assert.True(code == 0, err);
        var summary = JsonNode.Parse(json)!;
        Assert.Equal("moelora.plan/1", summary["schema"]!.GetValue<string>());
        // The four configs plus train.py, its settings and its stand-in data: every name the overwrite check guards.
        var written = summary["files"]!.AsArray().Select(f => Path.GetRelativePath(dir, f!.GetValue<string>()).Replace('\\', '/')).ToList();
        Assert.Equal(MoeLora.Cli.Plans.LaunchPlan.FileNames.Order(StringComparer.Ordinal), written.Order(StringComparer.Ordinal));
        Assert.Contains("train.py", written);

        // The same folder again: refused by name, nothing touched; --overwrite replaces.
        var before = File.ReadAllText(Path.Combine(dir, "deepspeed_config.json"));
        File.WriteAllText(Path.Combine(dir, "deepspeed_config.json"), "my own config");
        (code, _, err) = InProcessCli.RunCapturing(100, "plan", "Qwen/Qwen3-30B-A3B", "--gpus", "8", "--sharding", "zero3", "-o", dir);
        Assert.Equal(1, code);
        Assert.Contains("already holds accelerate_config.yaml, deepspeed_config.json", err);
        Assert.Contains("--overwrite", err);
        Assert.Equal("my own config", File.ReadAllText(Path.Combine(dir, "deepspeed_config.json")));
        (code, var md, err) = InProcessCli.RunCapturing(100, "plan", "Qwen/Qwen3-30B-A3B", "--gpus", "8", "--sharding", "zero3", "-o", dir, "--overwrite", "--format", "markdown");
        Assert.True(code == 0, err);
        Assert.Equal(before, File.ReadAllText(Path.Combine(dir, "deepspeed_config.json")));
        Assert.StartsWith("# MoeLora plan: Qwen/Qwen3-30B-A3B", md);
        Assert.Contains("| term | bytes |", md);
    }

    [Fact]
    public void Adapter_inspect_writes_markdown_too()
    {
        var (code, md, err) = InProcessCli.RunCapturing(100, "adapter", "inspect", Path.Combine(Fixture("mixtral"), "attn_plus_experts"), "--format", "markdown");
        Assert.True(code == 0, err);
        Assert.Contains("| module | parameter | location |", md);
    }

    /// <summary>Every terminal table at 100 columns: no line wider, and nothing cut off with an ellipsis.</summary>
    [Theory]
    [InlineData("models")]
    [InlineData("report", "mistralai/Mixtral-8x7B-v0.1")]
    [InlineData("report", "meta-llama/Llama-4-Scout-17B-16E-Instruct")]
    [InlineData("report", "deepseek-ai/DeepSeek-V3")]
    [InlineData("modules", "Qwen/Qwen3-30B-A3B")]
    [InlineData("diff", "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen3-30B-A3B")]
    [InlineData("plan", "Qwen/Qwen3-30B-A3B", "--gpus", "8", "--sharding", "zero3", "-o", "{tmp}")]
    [InlineData("plan", "deepseek-ai/DeepSeek-V3", "-o", "{tmp}")]
    [InlineData("adapter", "inspect", "{fixture}")]
    public void Tables_fit_100_columns(params string[] command)
    {
        var args = command.Select(a => a.Replace("{tmp}", Path.Combine(_tmp, "p"), StringComparison.Ordinal)
            .Replace("{fixture}", Path.Combine(Fixture("mixtral"), "attn_plus_experts"), StringComparison.Ordinal)).ToArray();
        var (_, stdout, err) = InProcessCli.RunCapturing(100, args);
        Assert.False(string.IsNullOrWhiteSpace(stdout), err);
        foreach (var line in stdout.Split('\n'))
        {
            Assert.True(line.TrimEnd().Length <= 100, $"{line.TrimEnd().Length} columns: {line}");
            Assert.DoesNotContain("…", line);
        }
    }
}
