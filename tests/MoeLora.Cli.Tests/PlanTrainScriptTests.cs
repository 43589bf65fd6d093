using System.Diagnostics;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using MoeLora.Cli.Infrastructure;
using MoeLora.Cli.Plans;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Training;

namespace MoeLora.Cli.Tests;

/// <summary>
/// <c>plan -o DIR</c> writes train.py (one static script) and train_settings.json: the settings are the plan's, the
/// training defaults the C# trainer's, and where python3 is installed the script compiles and its data order (a port of
/// .NET's System.Random) equals the C# trainer's.
/// </summary>
[Collection("cli")]
public sealed class PlanTrainScriptTests : IDisposable
{
    readonly string _dir = Path.Combine(Path.GetTempPath(), "moelora-plan-script-" + Guid.NewGuid().ToString("N"));

    public PlanTrainScriptTests()
    {
        Environment.SetEnvironmentVariable("HF_HUB_OFFLINE", "1"); // the embedded catalog answers, no network
        Directory.CreateDirectory(_dir);
    }

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    /// <summary>The CLI in process: exit code and stdout (stderr is in the assertion message when it fails).</summary>
    static (int Code, string Stdout, string Stderr) Run(params string[] args)
    {
        var saved = Consoles.Out;
        var (console, buffer) = Consoles.Plain(200);
        Consoles.Out = console;
        try
        {
            var (code, error) = InProcessCli.Run(args);
            return (code, buffer.ToString(), error);
        }
        finally { Consoles.Out = saved; }
    }

    /// <summary>Runs <c>moelora plan MODEL ARGS -o DIR</c> in process; returns the folder.</summary>
    string Plan(string name, string model, params string[] args)
    {
        var dir = Path.Combine(_dir, name);
        var r = Run(["plan", model, .. args, "-o", dir]);
        Assert.True(r.Code == 0, $"plan {model} exited {r.Code}: {r.Stderr}{r.Stdout}");
        return dir;
    }

    static JsonObject Json(string dir, string file) => JsonNode.Parse(File.ReadAllText(Path.Combine(dir, file)))!.AsObject();

    [Theory]
    [InlineData("mistralai/Mixtral-8x7B-v0.1", "circuit-breaker", "fsdp", 4, "10,20")]
    [InlineData("Qwen/Qwen3-30B-A3B", "circuit-breaker", "ddp", 1, "6,12")]
    [InlineData("meta-llama/Llama-4-Scout-17B-16E-Instruct", "circuit-breaker", "zero3", 8, null)]
    [InlineData("meta-llama/Meta-Llama-3.1-8B", "lora", "ddp", 2, null)]
    public void Settings_equal_the_plan(string model, string mode, string sharding, int gpus, string? targets)
    {
        string[] args = ["--mode", mode, "--sharding", sharding, "--gpus", gpus.ToString(System.Globalization.CultureInfo.InvariantCulture),
            "--batch-size", "2", "--seq-length", "1024", "--gradient-checkpointing", "-t", "q_proj,v_proj"];
        if (targets is not null) args = [.. args, "--cb-target-layers", targets];
        var dir = Plan("p", model, args);
        var s = Json(dir, TrainScript.SettingsFile);
        var plan = Json(dir, LaunchPlan.SummaryFile);
        var setup = plan["memory"]!["setup"]!.AsObject();

        Assert.Equal(TrainScript.Schema, (string?)s["schema"]);
        Assert.Equal(model, (string?)s["model"]);
        Assert.Equal((string?)plan["model"], (string?)s["model"]);
        // The class transformers builds for this config (e.g. the multimodal class for Llama 4).
        var report = JsonNode.Parse(Run("report", model, "--format", "json").Stdout)!.AsObject();
        Assert.Equal((string?)report["model"]!["architecture"], (string?)s["model_class"]);
        // Everything the memory prediction assumed, written by a different path (moelora_plan.json's setup).
        foreach (var key in new[] { "mode", "batch_size", "seq_length", "dtype", "quantization", "attention", "gradient_checkpointing", "gpus", "sharding" })
            Assert.True(JsonNode.DeepEquals(setup[key], s[key]), $"{key}: settings {s[key]?.ToJsonString()}, plan {setup[key]?.ToJsonString()}");
        var lengths = s["lengths"]!.AsObject();
        Assert.Equal(1024, (int)lengths["request"]! + (int)lengths["response"]!);
        Assert.Equal(1024, (int)lengths["retain"]!);
        long layers = (long)report["model"]!["num_hidden_layers"]!;
        long run = (long)setup["layers_run"]!;
        if (mode == "circuit-breaker")
        {
            var expected = targets?.Split(',').Select(int.Parse).ToArray() ?? [(int)(layers / 4), (int)(layers / 2)];
            Assert.Equal(expected, s["cb_target_layers"]!.AsArray().Select(x => (int)x!));
            Assert.Equal(expected.Max() + 1, run);
            Assert.Equal(run, (long)s["truncate_to_blocks"]!);
        }
        else
        {
            Assert.Null(s["cb_target_layers"]);
            Assert.Null(s["truncate_to_blocks"]);
            Assert.Equal(layers, run);
        }
        // The C# trainer's defaults, read from its options type, not retyped here.
        var d = new TrainOptions { TargetLayers = [1], OutputDir = "" };
        Assert.Equal(d.TotalSteps, (int)s["total_steps"]!);
        Assert.Equal(d.LearningRate, (double)s["lr"]!);
        Assert.Equal(d.LrSchedule, (string?)s["lr_schedule"]);
        Assert.Equal(d.Alpha, (double)s["cb_alpha"]!);
        Assert.Equal(d.LossWeighting, (string?)s["loss_weighting"]);
        Assert.Equal(d.MaxGradNorm, (double)s["max_grad_norm"]!);
        Assert.Equal(d.Seed, (long)s["seed"]!);
        Assert.Equal(d.GradientAccumulation, (int)s["gradient_accumulation"]!);
        // The LoRA is the plan's adapter_config.json, read by the script; the settings carry no second copy of it.
        foreach (var key in new[] { "r", "lora_alpha", "target_modules", "target_parameters", "layers_to_transform" })
            Assert.Null(s[key]);
        var adapter = Json(dir, LaunchPlan.PeftFile);
        Assert.Equal(["q_proj", "v_proj"], adapter["target_modules"]!.AsArray().Select(x => (string)x!).Order());
        Assert.False((bool)adapter["inference_mode"]!); // get_peft_model must leave the new adapters trainable
        // The data files the settings name exist in the folder, as the tool's tiny data.
        foreach (var (key, value) in s["data"]!.AsObject().Where(kv => kv.Value is JsonValue v && v.TryGetValue<string>(out _)))
        {
            var path = Path.Combine(dir, (string)value!);
            Assert.True(File.Exists(path), $"data.{key}: {path} missing");
            Assert.Equal(TinyData.Text(Path.GetFileName(path)), File.ReadAllText(path));
        }
        Assert.Contains("train.py", (string?)plan["launch"]);
    }

    [Fact]
    public void Every_plan_gets_the_same_script_with_no_model_specific_code()
    {
        var a = Plan("a", "mistralai/Mixtral-8x7B-v0.1", "--mode", "circuit-breaker", "--gpus", "2");
        var b = Plan("b", "Qwen/Qwen3-30B-A3B", "--sharding", "zero2", "--gpus", "4", "-t", "q_proj,v_proj");
        var script = File.ReadAllText(Path.Combine(a, TrainScript.ScriptFile));
        Assert.Equal(TrainScript.Script(), script);
        Assert.Equal(script, File.ReadAllText(Path.Combine(b, TrainScript.ScriptFile)));
        // What differs between models is data (the settings), never a branch on the model's family.
        foreach (var family in new[] { "mixtral", "qwen", "llama", "deepseek", "gpt_oss", "olmoe", "dbrx", "mistral", "granite" })
            Assert.False(Regex.IsMatch(script, $@"\b{family}\b", RegexOptions.IgnoreCase), $"train.py mentions {family}");
    }

    static string? Python()
    {
        var found = (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries)
            .Select(p => Path.Combine(p, "python3")).FirstOrDefault(File.Exists);
        return found;
    }

    static string RunPython(string python, params string[] args)
    {
        var psi = new ProcessStartInfo(python, args) { RedirectStandardOutput = true, RedirectStandardError = true };
        using var p = Process.Start(psi)!;
        var stdout = p.StandardOutput.ReadToEndAsync();
        var stderr = p.StandardError.ReadToEnd();
        Assert.True(p.WaitForExit(120_000), "python3 did not finish in 120 s");
        Assert.True(p.ExitCode == 0, $"python3 exited {p.ExitCode}: {stderr}");
        return stdout.Result;
    }

    // The script without torch: only its stdlib part (the data order) runs, which is what these tests need.
    const string Import = "import importlib.util, json, sys\n" +
        "spec = importlib.util.spec_from_file_location('train', sys.argv[1]); train = importlib.util.module_from_spec(spec); spec.loader.exec_module(train)\n";

    [SkippableFact]
    public void Written_script_compiles()
    {
        var python = Python();
        Skip.If(python is null, "python3 is not on PATH (the script's syntax check needs it)");
        var dir = Plan("c", "Qwen/Qwen3-30B-A3B", "--mode", "circuit-breaker", "-t", "q_proj,v_proj");
        RunPython(python!, "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], cfile=sys.argv[2], doraise=True)",
            Path.Combine(dir, TrainScript.ScriptFile), Path.Combine(_dir, "train.pyc"));
    }

    [SkippableFact]
    public void Script_random_numbers_equal_dotnet_System_Random()
    {
        var python = Python();
        Skip.If(python is null, "python3 is not on PATH");
        var script = Path.Combine(_dir, TrainScript.ScriptFile);
        File.WriteAllText(script, TrainScript.Script());
        int[] seeds = [0, 1, 42, 1_000_003, int.MaxValue, 0x5bd1e995 ^ 42, -7];
        var json = RunPython(python!, "-c", Import +
            "out = []\n" +
            "for seed in json.loads(sys.argv[2]):\n" +
            "    r = train.DotNetRandom(seed)\n" +
            "    out.append([r.next(n) for n in range(1, 200)] + [r.next_double() for _ in range(20)])\n" +
            "print(json.dumps(out))", script, System.Text.Json.JsonSerializer.Serialize(seeds));
        var got = JsonNode.Parse(json)!.AsArray();
        for (int i = 0; i < seeds.Length; i++)
        {
            var rng = new Random(seeds[i]);
            var want = Enumerable.Range(1, 199).Select(n => (double)rng.Next(n)).Concat(Enumerable.Range(0, 20).Select(_ => rng.NextDouble())).ToArray();
            var have = got[i]!.AsArray().Select(x => (double)x!).ToArray();
            Assert.Equal(want, have);
        }
    }

    [SkippableFact]
    public void Script_batches_hold_the_same_examples_as_the_CSharp_trainer()
    {
        var python = Python();
        Skip.If(python is null, "python3 is not on PATH");
        var script = Path.Combine(_dir, TrainScript.ScriptFile);
        File.WriteAllText(script, TrainScript.Script());
        const int nCb = 11, nRetain = 17, batch = 3, indices = 12; // 12 micro-batches: 3 epochs of 3 full batches + 3 more
        const long seed = 42;
        var json = RunPython(python!, "-c", Import +
            $"order = train.BatchOrder([{nCb}, {nRetain}], {batch}, {seed})\n" +
            $"print(json.dumps([order.rows(i) for i in range({indices})]))", script);
        var got = JsonNode.Parse(json)!.AsArray();

        // C#: rows tagged with their original index, through the trainer's own dataset.
        TorchRuntime.EnsureInitialized();
        static List<Tokenised> Rows(int n) => Enumerable.Range(0, n).Select(i => new Tokenised([i], [1])).ToList();
        var data = new CbDataset(Rows(nCb), Rows(nRetain), batch, seed);
        for (int i = 0; i < indices; i++)
        {
            var (cb, retain) = data.Get(i);
            Assert.Equal(cb.InputIds.data<long>().ToArray(), got[i]![0]!.AsArray().Select(x => (long)x!));
            Assert.Equal(retain.InputIds.data<long>().ToArray(), got[i]![1]!.AsArray().Select(x => (long)x!));
        }
    }
    // A stand-in for the tiny preset's tokenizer (byte-level, no merges: a byte's id is its value; specials 256..),
    // so the script's templates, readers and padding run without the tokenizers package.
    const string FakeTokenizer =
        "import re\n" +
        "class FakeTokenizer:\n" +
        "    def __init__(self, specials, pad):\n" +
        "        self.specials, self.pad_token_id = specials, pad\n" +
        "        self.split = re.compile('(' + '|'.join(re.escape(t) for t in specials) + ')')\n" +
        "    def __call__(self, text, add_special_tokens):\n" +
        "        ids = [256] if add_special_tokens else []\n" +
        "        for part in self.split.split(text):\n" +
        "            ids += [256 + self.specials.index(part)] if part in self.specials else list(part.encode('utf-8'))\n" +
        "        return {'input_ids': ids}\n";

    [SkippableTheory]
    [InlineData("mistralai/Mixtral-8x7B-v0.1")]
    [InlineData("meta-llama/Meta-Llama-3.1-8B")]
    public void Script_tokenises_the_data_as_the_CSharp_trainer(string model)
    {
        var python = Python();
        Skip.If(python is null, "python3 is not on PATH");
        var dir = Plan("t", model, "--mode", "circuit-breaker", "-t", "q_proj,v_proj");
        var tokenizer = new MoeLora.Torch.Text.HfTokenizer(TrainPreset.TinyTokenizerJson());
        var settings = Json(dir, TrainScript.SettingsFile);
        var template = ChatTemplate.Get((string)settings["chat_template"]!["name"]!);
        var lengths = new CbLengths(80, 64, 96); // the tiny preset's: truncation and both padding sides happen
        string Data(string file) => Path.Combine(dir, "data", file);
        var json = RunPython(python!, "-c", Import + FakeTokenizer +
            "s = json.load(open(sys.argv[2]))\n" +
            $"tok = train.Tokeniser(FakeTokenizer(json.loads(sys.argv[3]), {tokenizer.PadId}), s['chat_template'], dict(request=80, response=64, retain=96))\n" +
            "d = s['data']; base = sys.argv[4]\n" +
            "cb = tok.load_circuit_breaker(base + '/' + d['cb'], 0.5, 42)\n" +
            "retain = tok.load_retain(base + '/' + d['retain']) + tok.load_retain(base + '/' + d['refusal'])\n" +
            "print(json.dumps(dict(cb=cb, retain=retain)))",
            Path.Combine(dir, TrainScript.ScriptFile), Path.Combine(dir, TrainScript.SettingsFile),
            System.Text.Json.JsonSerializer.Serialize(TrainPreset.TinySpecials), dir);
        var got = JsonNode.Parse(json)!.AsObject();

        var loader = new CbDataLoader(tokenizer, template, lengths);
        var cb = loader.LoadCircuitBreaker(Data("cb_train.jsonl"), 0.5, 42);
        var retain = loader.LoadRetain(Data("retain_train.jsonl"));
        retain.AddRange(loader.LoadRetain(Data("refusal.jsonl")));
        void Same(List<Tokenised> want, JsonArray have, string what)
        {
            Assert.Equal(want.Count, have.Count);
            for (int i = 0; i < want.Count; i++)
            {
                Assert.True(want[i].Ids.SequenceEqual(have[i]![0]!.AsArray().Select(x => (long)x!)), $"{what} row {i}: input ids differ");
                Assert.True(want[i].Mask.SequenceEqual(have[i]![1]!.AsArray().Select(x => (long)x!)), $"{what} row {i}: masks differ");
            }
        }
        Same(cb, got["cb"]!.AsArray(), "circuit-breaker");
        Same(retain, got["retain"]!.AsArray(), "retain");
        // The comparison covers padding and truncation: requests are left-padded, responses cut at 64 tokens.
        Assert.Contains(cb, t => t.Mask[0] == 0);
        Assert.Contains(cb, t => t.Mask[^1] == 1);
    }
    [SkippableFact]
    public void Script_schedules_equal_the_CSharp_trainer()
    {
        var python = Python();
        Skip.If(python is null, "python3 is not on PATH");
        var script = Path.Combine(_dir, TrainScript.ScriptFile);
        File.WriteAllText(script, TrainScript.Script());
        const int total = 37, warmup = 5;
        var json = RunPython(python!, "-c", Import +
            $"c = {{k: [train.coefficients(k, 5.0, t, {total}) for t in range(1, {total} + 1)] for k in ('dual', 'constant', 'linear')}}\n" +
            $"lr = {{k: [train.learning_rate(dict(lr=1e-3, warmup_steps={warmup}, total_steps={total}, lr_schedule=k), t) for t in range({total})] for k in ('constant', 'linear', 'cosine')}}\n" +
            "print(json.dumps(dict(c=c, lr=lr)))", script);
        var got = JsonNode.Parse(json)!.AsObject();
        foreach (var kind in CoefficientSchedule.Kinds)
        {
            var schedule = CoefficientSchedule.Create(kind, 5.0, total);
            var have = got["c"]![kind]!.AsArray();
            for (int t = 1; t <= total; t++)
            {
                var (r, c) = schedule.At(t);
                Assert.Equal(r, (double)have[t - 1]![0]!);
                Assert.Equal(c, (double)have[t - 1]![1]!);
            }
        }
        foreach (var kind in LrSchedule.Kinds)
        {
            var schedule = LrSchedule.Create(kind, 1e-3, total, warmup);
            var have = got["lr"]![kind]!.AsArray();
            for (int t = 0; t < total; t++) Assert.Equal(schedule.At(t), (double)have[t]!, 15);
        }
    }

    [SkippableFact]
    public void Script_flags_override_the_settings()
    {
        var python = Python();
        Skip.If(python is null, "python3 is not on PATH");
        var dir = Plan("f", "mistralai/Mixtral-8x7B-v0.1", "--mode", "circuit-breaker", "-t", "q_proj,v_proj");
        var data = Path.Combine(_dir, "mydata");
        Directory.CreateDirectory(data);
        string Load(params string[] flags) => RunPython(python!, ["-c", Import +
            "s, base = train.load_settings(train.parse_args(sys.argv[2:]))\nprint(json.dumps(s))", Path.Combine(dir, TrainScript.ScriptFile), .. flags]);
        var plain = JsonNode.Parse(Load())!.AsObject();
        Assert.Equal(Path.Combine(dir, "data", "cb_train.jsonl"), (string?)plain["data"]!["cb"]);
        Assert.Equal(Path.Combine(dir, "data", "refusal.jsonl"), (string?)plain["data"]!["refusal"]);
        Assert.Equal(Path.Combine(dir, "output"), (string?)plain["output"]);
        Assert.Equal(150, (int)plain["total_steps"]!);
        // --data: the same file names in another folder, refusal.jsonl only when it is there.
        var other = JsonNode.Parse(Load("--data", data, "--max-steps", "3", "--seed", "7", "--output", Path.Combine(_dir, "o"), "--model", "/m"))!.AsObject();
        Assert.Equal(Path.Combine(data, "cb_train.jsonl"), (string?)other["data"]!["cb"]);
        Assert.Equal(Path.Combine(data, "retain_train.jsonl"), (string?)other["data"]!["retain"]);
        Assert.Null(other["data"]!["refusal"]);
        Assert.Equal(3, (int)other["total_steps"]!);
        Assert.Equal(7, (int)other["seed"]!);
        Assert.Equal(Path.Combine(_dir, "o"), (string?)other["output"]);
        Assert.Equal("/m", (string?)other["model"]);
    }
}
