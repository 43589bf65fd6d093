using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Training;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests.Training;

/// <summary>Builds the tiny preset's model, adapter, data and trainer the way <c>moelora train --preset tiny</c> does.</summary>
public sealed class TinyRun : IDisposable
{
    public static string DataDir => Path.Combine(AppContext.BaseDirectory, "Data", "tiny");
    public CausalLm Model { get; }
    public InjectedAdapter Adapter { get; }
    public CbDataset Data { get; }
    public CircuitBreakerTrainer Trainer { get; }
    public TrainPreset Preset { get; } = TrainPreset.Get("tiny");

    public TinyRun(string output, int totalSteps, int batchSize = 2, int accumulation = 1, int checkpointEvery = 0, long seed = 1, double? lr = null)
    {
        TorchRuntime.EnsureInitialized();
        set_num_threads(1); // as `moelora train --preset tiny`: more threads only contend on small tensors
        var p = Preset;
        int layers = CbModels.TruncatedLayers(p.TargetLayers, CbModels.ModelLayers(null), false);
        Model = CbModels.Load(null, layers, ScalarType.Float32, CPU);
        Adapter = CbModels.InjectAdapter(Model, p.AdapterConfigJson(null, Enumerable.Range(0, layers).ToList()), seed, wholeModelConfigJson: TrainPreset.TinyConfigJson());
        var loader = new CbDataLoader(CbModels.Tokenizer(null), ChatTemplate.Get("llama3"), p.Lengths);
        var cb = loader.LoadCircuitBreaker(Path.Combine(DataDir, "cb_train.jsonl"));
        var retain = loader.LoadRetain(Path.Combine(DataDir, "retain_train.jsonl"));
        Data = new CbDataset(cb, retain, batchSize, seed);
        Trainer = new CircuitBreakerTrainer(Model, Adapter, Data, new TrainOptions
        {
            TargetLayers = p.TargetLayers, Alpha = p.Alpha, TotalSteps = totalSteps, LearningRate = lr ?? p.LearningRate,
            GradientAccumulation = accumulation, Seed = seed, CheckpointEvery = checkpointEvery, OutputDir = output,
        });
    }

    public void Dispose() => Model.Dispose();
}

public sealed class TempDir : IDisposable
{
    public string Path { get; } = System.IO.Path.Combine(System.IO.Path.GetTempPath(), $"moelora-train-{Guid.NewGuid():N}");
    public TempDir() => Directory.CreateDirectory(Path);
    public void Dispose() { try { Directory.Delete(Path, true); } catch (IOException) { } }
}
