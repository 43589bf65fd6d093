using System.Globalization;
using System.Text.Json.Nodes;
using MoeLora.Core.Analysis;
using MoeLora.Core.Architectures;
using MoeLora.Core.Catalog;
using MoeLora.Core.Config;
using MoeLora.Core.Memory;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;
using MoeLora.Core.Tests.Support;
using Xunit.Abstractions;

namespace MoeLora.Core.Tests.Memory;

/// <summary>
/// The memory model against measured <c>torch.cuda.max_memory_allocated</c> of real transformers 5.17 + PEFT 0.21
/// training steps on an H200 (Data/memory/memory_h200.json, copied from shared/oracle). Goal: within 10%.
/// </summary>
public class MeasuredMemoryTests(ITestOutputHelper output)
{
    private static readonly Lazy<JsonObject> Measured = new(() =>
        JsonNode.Parse(File.ReadAllText(Path.Combine(OracleData.DataDir, "memory", "memory_h200.json")))!.AsObject());

    internal static ModelSpec Spec(string key)
    {
        Assert.True(ModelCatalog.TryGetConfigJson(OracleData.HubId(key), out var json));
        return ArchitectureRegistry.Build(ModelConfig.Parse(json, key), Layout.V5);
    }

    /// <summary>Every training step in the file (no_grad forwards are not training steps).</summary>
    public static TheoryData<string, int> Steps()
    {
        var data = new TheoryData<string, int>();
        foreach (var run in Measured.Value["runs"]!.AsArray())
        {
            var steps = run!["steps"]!.AsArray();
            for (var i = 0; i < steps.Count; i++)
                if (steps[i]!["mode"]?.GetValue<string>() != "no_grad_forward") data.Add(run["key"]!.GetValue<string>(), i);
        }
        return data;
    }

    internal static (TrainingMemory Estimate, long Measured, string Label) Predict(string key, int index)
    {
        var run = Measured.Value["runs"]!.AsArray().First(r => r!["key"]!.GetValue<string>() == key)!;
        var step = run["steps"]![index]!;
        var spec = Spec(key);
        var plan = AdapterPlanner.Plan(spec, LoraConfig.SeedDefault, null);
        Assert.Equal(run["trainable"]!.GetValue<long>(), plan.TrainableParameters);
        var cb = step["mode"]?.GetValue<string>() == "circuit_breaker";
        var setup = new TrainingSetup
        {
            BatchSize = step["batch"]!.GetValue<int>(),
            SeqLength = step["seq"]!.GetValue<int>(),
            DType = DType.BFloat16,
            GradientCheckpointing = step["grad_ckpt"]!.GetValue<bool>(),
            Attention = TrainingSetup.ParseAttention(run["attn_implementation"]!.GetValue<string>()),
            Mode = cb ? TrainingMode.CircuitBreaker : TrainingMode.Lora,
            TargetLayers = cb ? step["cb_target_layers"]!.AsArray().Select(x => x!.GetValue<int>()).ToList() : null,
            CbFullLayers = true, // the measured step does not truncate
            GpuMemoryBytes = Measured.Value["gpu_total_bytes"]!.GetValue<long>(),
        };
        var label = $"{key} b{setup.BatchSize} s{setup.SeqLength}{(setup.GradientCheckpointing ? " gc" : "")}{(step["output_hidden_states"]!.GetValue<bool>() ? " hs" : "")}{(cb ? " cb" : "")}";
        return (TrainingMemory.Estimate(plan, setup), step["peak_alloc"]!.GetValue<long>(), label);
    }

    [Theory]
    [MemberData(nameof(Steps))]
    public void Peak_within_10_percent_of_measured(string key, int index)
    {
        var (estimate, measured, label) = Predict(key, index);
        var error = (estimate.PerGpuBytes - (double)measured) / measured;
        output.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"{label}: predicted {estimate.PerGpuBytes:N0} measured {measured:N0} error {error:+0.00%;-0.00%} ({estimate.Phase})"));
        foreach (var t in estimate.Terms) output.WriteLine($"  {t.Name,-26} {Units.Bytes(t.Bytes),12}");
        Assert.InRange(Math.Abs(error), 0, 0.10);
    }

    [Theory]
    [MemberData(nameof(Steps))]
    public void Step_transient_error_is_reported(string key, int index)
    {
        // The harder check: the step's own peak above the persistent state (peak - start), which excludes the weights,
        // against the step terms (activations, checkpoints, loss buffers, hidden states). The harness creates AdamW
        // states inside the step (after the activations are gone), so those are left out of both sides.
        var (estimate, measured, label) = Predict(key, index);
        var run = Measured.Value["runs"]!.AsArray().First(r => r!["key"]!.GetValue<string>() == key)!;
        var start = run["steps"]![index]!["start_alloc"]!.GetValue<long>();
        string[] persistent = ["base_weights", "quant_state", "lora_adapters", "modules_to_save", "gradients", "optimizer_states", "cuda_workspace"];
        var predictedTransient = estimate.Terms.Where(t => !persistent.Contains(t.Name)).Sum(t => t.Bytes);
        var measuredTransient = measured - start;
        var error = (predictedTransient - (double)measuredTransient) / measuredTransient;
        output.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"{label}: transient predicted {Units.Bytes(predictedTransient)} measured {Units.Bytes(measuredTransient)} error {error:+0.0%;-0.0%}"));
        // Mixtral with checkpointing is 12% under (an unexplained ~180 MB at its loss peak); the rest are within 2.1%.
        Assert.InRange(Math.Abs(error), 0, 0.15);
    }

    [Fact]
    public void Weights_match_the_measured_allocation()
    {
        foreach (var run in Measured.Value["runs"]!.AsArray())
        {
            var key = run!["key"]!.GetValue<string>();
            var spec = Spec(key);
            Assert.Equal(run["num_params"]!.GetValue<long>(), spec.Tree.NumParameters);
            var (q, st, plain) = WeightMemory.Bytes(spec, DType.BFloat16, Quantization.None);
            Assert.Equal(0, q + st);
            // Buffers (rotary inv_freq) and the allocator's 512-byte rounding add a few hundred bytes; the two
            // grouped_mm MoE runs had already allocated both 32 MiB cuBLAS workspaces (+ ~2 MB) when weights_alloc was read.
            Assert.InRange(run["weights_alloc"]!.GetValue<long>() - plain, 0, (64 << 20) + (4 << 20));
            var plan = AdapterPlanner.Plan(spec, LoraConfig.SeedDefault, null);
            Assert.Equal(run["after_lora_alloc"]!.GetValue<long>() - run["weights_alloc"]!.GetValue<long>(), 4 * plan.TrainableParameters);
        }
    }
}
