using System.Diagnostics;
using System.Globalization;
using MoeLora.Core.Analysis;
using MoeLora.Core.Architectures;
using MoeLora.Core.Catalog;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

// Usage: dotnet run -c Release --project bench/MoeLora.Bench -- [--moelora PATH] [--runs N]
// PATH is a published moelora (bench/run.sh publishes it as a user installs it); without it only the in-process sweep runs.
var moelora = Arg("--moelora");
var runs = int.Parse(Arg("--runs") ?? "7", CultureInfo.InvariantCulture);

Console.WriteLine($"# moelora config-only analysis benchmark ({DateTime.UtcNow:yyyy-MM-dd})");
Console.WriteLine($"machine: {Environment.ProcessorCount} logical cores, {Cpu()}; .NET {Environment.Version}");
Console.WriteLine();

// In-process: every catalog model with the seed's LoraConfig, as one sweep: first the analysis (module tree + PEFT
// plan: every count and tensor), then the full report (adds re-planned recommendations and the memory-fit search).
var ids = ModelCatalog.Entries.Select(e => e.Id).ToList();
foreach (var (label, full) in new[] { ("tree + PEFT plan", false), ("full report + JSON", true) })
{
    void Run() => Sweep(full);
    for (var i = 0; i < 10; i++) Run(); // warm-up: let tiered JIT promote the hot methods
    var sweeps = Enumerable.Range(0, runs).Select(_ => Time(Run)).Order().ToList();
    Console.WriteLine($"in-process sweep of {ids.Count} catalog models ({label}): median {sweeps[sweeps.Count / 2]:F1} ms, min {sweeps[0]:F1} ms over {runs} runs");
}
Console.WriteLine();

if (args.Contains("--phases"))
{
    // Where the sweep's time goes, per model: tree, PEFT plan, full report (findings re-plan suggestions), JSON.
    Console.WriteLine("| model | tree ms | plan ms | report ms | json ms |");
    Console.WriteLine("|---|---:|---:|---:|---:|");
    foreach (var id in ids)
    {
        var config = new ModelConfig(ModelCatalog.TryGetConfig(id)!);
        ModelSpec? spec = null;
        LoraReport? report = null;
        var tree = Best(() => spec = ArchitectureRegistry.Build(config, Layout.V5));
        var plan = Best(() => AdapterPlanner.Plan(spec!, LoraConfig.SeedDefault));
        var rep = Best(() => report = LoraReport.Build(spec!, LoraConfig.SeedDefault, null, new ReportOptions { ModelId = id }));
        var json = Best(() => report!.ToJson().ToJsonString());
        Console.WriteLine($"| {id} | {tree:F2} | {plan:F2} | {rep:F2} | {json:F2} |");
    }
    Console.WriteLine();
}

if (moelora is not null)
{
    Console.WriteLine("| model | cold `report --format json`, median ms | min ms |");
    Console.WriteLine("|---|---:|---:|");
    foreach (var id in ids)
    {
        var times = Enumerable.Range(0, runs).Select(_ => Time(() => RunProcess(moelora, id))).Order().ToList();
        Console.WriteLine($"| {id} | {times[times.Count / 2]:F0} | {times[0]:F0} |");
    }
}
return 0;

void Sweep(bool full)
{
    foreach (var id in ids)
    {
        try
        {
            var spec = ArchitectureRegistry.Build(new ModelConfig(ModelCatalog.TryGetConfig(id)!), Layout.V5);
            if (full) _ = LoraReport.Build(spec, LoraConfig.SeedDefault, null, new ReportOptions { ModelId = id }).ToJson().ToJsonString();
            else _ = AdapterPlanner.Plan(spec, LoraConfig.SeedDefault);
        }
        catch (ConfigException)
        {
            // a catalog model this build does not support is skipped, not timed
        }
    }
}

double Best(Action a) => Enumerable.Range(0, runs).Select(_ => Time(a)).Min();

static double Time(Action a)
{
    var sw = Stopwatch.StartNew();
    a();
    return sw.Elapsed.TotalMilliseconds;
}

static void RunProcess(string exe, string id)
{
    var psi = new ProcessStartInfo(exe) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
    foreach (var a in new[] { "report", id, "--format", "json" }) psi.ArgumentList.Add(a);
    psi.Environment["HF_HUB_OFFLINE"] = "1";
    using var p = Process.Start(psi)!;
    p.StandardOutput.ReadToEnd();
    p.StandardError.ReadToEnd();
    p.WaitForExit();
    if (p.ExitCode != 0) throw new InvalidOperationException($"moelora report {id} failed with exit code {p.ExitCode}");
}

string? Arg(string name)
{
    var i = Array.IndexOf(args, name);
    return i >= 0 && i + 1 < args.Length ? args[i + 1] : null;
}

static string Cpu()
{
    try
    {
        return File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name", StringComparison.Ordinal))?.Split(':', 2)[1].Trim() ?? "unknown CPU";
    }
    catch (IOException)
    {
        return "unknown CPU";
    }
}
