using System.Buffers.Binary;
using System.Security.Cryptography;
using System.Text;

namespace MoeLora.Cli.Tests;

/// <summary>
/// What a careless user does, run as a real process on real files: corrupted checkpoints, adapters and configs, bad
/// flag values, a finished run, a non-empty merge target, SIGTERM mid-training. Each ends in exit 1 or 2 with one
/// clear line (or 130 with a resumable checkpoint), and nothing the user had is lost.
/// </summary>
public sealed class NoLostWorkTests : IDisposable
{
    static readonly string Mixtral = Path.Combine(AppContext.BaseDirectory, "Data", "hf-tiny", "mixtral");
    static string Model => Path.Combine(Mixtral, "model");
    static string Adapter => Path.Combine(Mixtral, "attn_plus_experts");

    readonly string _tmp = Directory.CreateTempSubdirectory("moelora-lostwork-").FullName;

    public void Dispose() => Directory.Delete(_tmp, recursive: true);

    string Dir(string name)
    {
        var d = Path.Combine(_tmp, name);
        Directory.CreateDirectory(d);
        return d;
    }

    string Prompts()
    {
        var p = Path.Combine(_tmp, "prompts.jsonl");
        File.WriteAllText(p, "{\"input_ids\": [1, 2, 3]}\n");
        return p;
    }

    // ---- corrupted safetensors: one line naming the file, exit 1, for every command that reads weights ----

    /// <summary>The header of a real safetensors file rewritten by <paramref name="edit"/> (the length field follows).</summary>
    static byte[] WithHeader(string file, Func<string, string> edit)
    {
        var bytes = File.ReadAllBytes(file);
        int n = (int)BinaryPrimitives.ReadUInt64LittleEndian(bytes);
        var header = Encoding.UTF8.GetBytes(edit(Encoding.UTF8.GetString(bytes, 8, n)));
        var result = new byte[8 + header.Length + bytes.Length - 8 - n];
        BinaryPrimitives.WriteUInt64LittleEndian(result, (ulong)header.Length);
        header.CopyTo(result, 8);
        bytes.AsSpan(8 + n).CopyTo(result.AsSpan(8 + header.Length));
        return result;
    }

    public static TheoryData<string> Corruptions => new() { "not-json", "no-dtype", "truncated", "huge-length", "bad-offsets", "duplicate" };

    static byte[] Corrupt(string file, string kind) => kind switch
    {
        "not-json" => WithHeader(file, h => "{" + new string('x', h.Length - 1)),
        "no-dtype" => WithHeader(file, h => h.Replace("\"dtype\"", "\"dtypx\"")),
        "truncated" => File.ReadAllBytes(file)[..^7],
        "huge-length" => [.. BitConverter.GetBytes(ulong.MaxValue / 3), .. File.ReadAllBytes(file)[8..]],
        "bad-offsets" => WithHeader(file, h => h.Replace("\"data_offsets\":[0,", "\"data_offsets\":[8,")),
        "duplicate" => WithHeader(file, h => h.Insert(1, h[1..h.IndexOf("},", StringComparison.Ordinal)] + "},")),
        _ => throw new ArgumentOutOfRangeException(nameof(kind)),
    };

    string CorruptModel(string kind)
    {
        var dir = Dir("model-" + kind);
        File.Copy(Path.Combine(Model, "config.json"), Path.Combine(dir, "config.json"));
        File.WriteAllBytes(Path.Combine(dir, "model.safetensors"), Corrupt(Path.Combine(Model, "model.safetensors"), kind));
        return dir;
    }

    [Theory]
    [MemberData(nameof(Corruptions))]
    public void A_corrupted_checkpoint_is_one_line_for_load_model(string kind)
    {
        var dir = CorruptModel(kind);
        var r = MoeloraProcess.Run("report", dir, "--load-model", "--seq-length", "4", "--dtype", "fp32");
        MoeloraProcess.AssertCleanError(r, 1, "model.safetensors");
    }

    [Fact]
    public void A_corrupted_checkpoint_is_one_line_for_every_runtime_command()
    {
        var dir = CorruptModel("not-json");
        var prompts = Prompts();
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("hidden-states", dir, "--prompts", prompts, "-o", Path.Combine(_tmp, "h.safetensors")), 1, "not valid JSON");
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("routers", dir, "--harmful", prompts, "--benign", prompts), 1, "not valid JSON");
        var merged = Path.Combine(_tmp, "merged");
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("merge", dir, "--adapter", Adapter, "-o", merged), 1, "not valid JSON");
        Assert.False(Directory.Exists(merged), "a failed merge left its output folder behind");
        Assert.Empty(Directory.GetDirectories(_tmp, "merged*"));
        Assert.False(File.Exists(Path.Combine(_tmp, "h.safetensors")));
    }

    [Theory]
    [InlineData("weights-no-dtype", "adapter_model.safetensors")]
    [InlineData("weights-truncated", "adapter_model.safetensors")]
    [InlineData("config-truncated", "adapter_config.json")]
    [InlineData("config-array", "adapter_config.json")]
    public void A_corrupted_adapter_is_one_line(string kind, string file)
    {
        var dir = Dir("adapter-" + kind);
        foreach (var f in Directory.GetFiles(Adapter)) File.Copy(f, Path.Combine(dir, Path.GetFileName(f)));
        var weights = Path.Combine(dir, "adapter_model.safetensors");
        var config = Path.Combine(dir, "adapter_config.json");
        switch (kind)
        {
            case "weights-no-dtype": File.WriteAllBytes(weights, Corrupt(weights, "no-dtype")); break;
            case "weights-truncated": File.WriteAllBytes(weights, Corrupt(weights, "truncated")); break;
            case "config-truncated": File.WriteAllText(config, File.ReadAllText(config)[..40]); break;
            case "config-array": File.WriteAllText(config, "[1, 2]"); break;
        }
        var r = MoeloraProcess.Run("hidden-states", Model, "--adapter", dir, "--prompts", Prompts(), "-o", Path.Combine(_tmp, "h.safetensors"));
        MoeloraProcess.AssertCleanError(r, 1, file);
    }

    [Fact]
    public void A_garbage_lora_config_names_file_line_and_column()
    {
        var file = Path.Combine(_tmp, "lora.json");
        File.WriteAllText(file, "{\"r\": 8,\n  \"lora_alpha\": }");
        var r = MoeloraProcess.Run("train", "--output", Path.Combine(_tmp, "run"), "--lora-config", file);
        MoeloraProcess.AssertCleanError(r, 1, "line 2, column");
        Assert.Contains("lora.json", r.Stderr);
        Assert.False(Directory.Exists(Path.Combine(_tmp, "run")));
    }

    // ---- flag values: exit 2 before any work, naming the flag as typed ----

    [Theory]
    [InlineData("--threads 0", "--threads")]
    [InlineData("-r abc", "-r")]
    [InlineData("-r 0", "--rank")]
    [InlineData("--lora-alpha -2", "--lora-alpha")]
    [InlineData("--lora-dropout 1.5", "--lora-dropout")]
    [InlineData("--total-steps 0", "--total-steps")]
    [InlineData("--lr 0", "--lr")]
    [InlineData("--lr-schedule cosinus", "--lr-schedule")]
    [InlineData("--request-length 0", "--request-length")]
    [InlineData("--max-memory-gb -1", "--max-memory-gb")]
    [InlineData("--warmup-steps 9 --total-steps 4", "--warmup-steps")]
    [InlineData("--preset giant", "--preset")]
    [InlineData("--resume --overwrite", "--resume")]
    [InlineData("--gradient-checkpointing --lora-dropout 0.1", "--gradient-checkpointing")]
    public void A_bad_train_flag_is_a_usage_error_naming_it(string flags, string named)
    {
        var output = Path.Combine(_tmp, "run");
        var r = MoeloraProcess.Run(["train", "--output", output, .. flags.Split(' ')]);
        MoeloraProcess.AssertCleanError(r, 2, named);
        Assert.DoesNotContain("Nullable", r.Stderr);
        Assert.False(Directory.Exists(output));
    }

    [Theory]
    [InlineData("report --format yaml", "--format")]
    [InlineData("report --layout v3", "--layout")]
    [InlineData("report --seq-length 0", "--seq-length")]
    [InlineData("report --gpus 0", "--gpus")]
    [InlineData("report --dtype fp8", "--dtype")]
    [InlineData("report --alpha nope", "--alpha")]
    [InlineData("models --format csv", "--format")]
    [InlineData("merge MODEL --adapter X", "--output")]
    public void A_bad_flag_is_a_usage_error_naming_it(string command, string named) =>
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run(command.Split(' ')), 2, named);

    // ---- never destroy what the user has ----

    static Dictionary<string, string> Snapshot(string dir) =>
        Directory.GetFiles(dir, "*", SearchOption.AllDirectories)
            .ToDictionary(f => Path.GetRelativePath(dir, f), f => Convert.ToHexString(SHA256.HashData(File.ReadAllBytes(f))));

    static MoeloraProcess.Result Train(string output, params string[] more) =>
        MoeloraProcess.Run(["train", "--output", output, "--total-steps", "2", "--checkpoint-every", "1", .. more]);

    [Fact]
    public void A_finished_run_is_never_replaced_without_resume_or_overwrite()
    {
        var run = Path.Combine(_tmp, "run");
        var first = Train(run);
        Assert.True(first.ExitCode == 0, first.Stderr);
        var before = Snapshot(run);
        Assert.Contains("adapter_model.safetensors", before.Keys);

        MoeloraProcess.AssertCleanError(Train(run), 1, "already holds a finished run (2/2 steps)");
        MoeloraProcess.AssertCleanError(Train(run, "-r", "4"), 1, "--resume");
        Assert.Equal(before, Snapshot(run));

        // --resume with settings that would break the run: refused, each one listed, nothing touched.
        var changed = Train(run, "--resume", "-r", "4", "--lr", "0.01");
        MoeloraProcess.AssertCleanError(changed, 1, "--rank 4 (run: 8)");
        Assert.Contains("--lr 0.01", changed.Stderr);
        Assert.Equal(before, Snapshot(run));

        // --overwrite is the explicit way to start again there.
        var again = Train(run, "--overwrite", "--seed", "7");
        Assert.True(again.ExitCode == 0, again.Stderr);
        Assert.NotEqual(before["adapter_model.safetensors"], Snapshot(run)["adapter_model.safetensors"]);
    }

    [Fact]
    public void A_foreign_folder_is_refused_and_kept()
    {
        var dir = Dir("mine");
        File.WriteAllText(Path.Combine(dir, "notes.txt"), "my notes");
        MoeloraProcess.AssertCleanError(Train(dir), 1, "not empty (notes.txt)");
        Assert.Equal(["notes.txt"], Directory.GetFileSystemEntries(dir).Select(Path.GetFileName));
    }

    [Fact]
    public void A_failed_resume_leaves_no_folder_behind()
    {
        var run = Path.Combine(_tmp, "never");
        MoeloraProcess.AssertCleanError(Train(run, "--resume"), 1, "no checkpoint");
        Assert.False(Directory.Exists(run));
    }

    [Fact]
    public void Merge_refuses_a_non_empty_target_and_keeps_its_files()
    {
        var target = Dir("target");
        File.WriteAllText(Path.Combine(target, "keep.txt"), "precious");
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("merge", Model, "--adapter", Adapter, "-o", target), 1, "not empty (keep.txt)");
        Assert.Equal("precious", File.ReadAllText(Path.Combine(target, "keep.txt")));
        Assert.Single(Directory.GetFileSystemEntries(target));
    }

    [SkippableFact]
    public void A_folder_that_refuses_writes_names_the_users_file_not_a_temporary_one()
    {
        // /proc takes no new files, even from root: the write of the temporary sibling fails there.
        Skip.IfNot(OperatingSystem.IsLinux(), "/proc is Linux's");
        var target = "/proc/moelora-report.json";
        var r = MoeloraProcess.Run("report", "mistralai/Mixtral-8x7B-v0.1", "--format", "json", "-o", target);
        MoeloraProcess.AssertCleanError(r, 1, $"cannot write {target}");
        Assert.DoesNotContain(".tmp", r.Stderr);
    }

    // ---- SIGTERM (schedulers, docker stop) stops at a step boundary with a resumable checkpoint ----

    [Fact]
    public async Task Sigterm_mid_training_saves_a_checkpoint_that_resumes()
    {
        var run = Path.Combine(_tmp, "sig");
        using var p = MoeloraProcess.Start(null, null, "train", "--output", run, "--total-steps", "100000", "--checkpoint-every", "0");
        var stdout = new StringBuilder();
        var firstStep = new TaskCompletionSource();
        p.OutputDataReceived += (_, e) =>
        {
            if (e.Data is null) return;
            lock (stdout) stdout.AppendLine(e.Data);
            if (e.Data.StartsWith("step ", StringComparison.Ordinal)) firstStep.TrySetResult();
        };
        var stderr = p.StandardError.ReadToEndAsync();
        p.BeginOutputReadLine();
        try
        {
            await firstStep.Task.WaitAsync(TimeSpan.FromSeconds(90));
            Assert.Equal(0, Kill(p.Id, 15)); // SIGTERM
            Assert.True(p.WaitForExit(60_000), "SIGTERM did not stop training");
        }
        finally { if (!p.HasExited) p.Kill(true); }
        p.WaitForExit();
        var errors = await stderr;
        Assert.True(p.ExitCode == 130, $"exit {p.ExitCode}: {errors}");
        Assert.Contains("interrupted at step", stdout.ToString());
        Assert.Equal("", errors);
        var state = File.ReadAllText(Path.Combine(run, "checkpoint", "trainer_state.json"));
        Assert.Contains("\"total_steps\": 100000", state);

        // The checkpoint is a real one: --resume with the same settings picks it up (and is refused with others).
        MoeloraProcess.AssertCleanError(MoeloraProcess.Run("train", "--output", run, "--total-steps", "100001", "--resume"), 1, "--total-steps 100001 (run: 100000)");
    }

    [System.Runtime.InteropServices.DllImport("libc", EntryPoint = "kill", SetLastError = true)]
    static extern int Kill(int pid, int signal);
}
