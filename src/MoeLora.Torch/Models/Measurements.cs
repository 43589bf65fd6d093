using MoeLora.Torch.Lora;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Models;

/// <summary>Parameter counts as PEFT's get_nb_trainable_parameters computes them (dedup by object identity).</summary>
public sealed record ParameterCounts(long Total, long Trainable, long TotalBytes, long TrainableBytes);

/// <summary>Tensors that share one storage (same base data pointer): the evidence for or against weight sharing.</summary>
public sealed record SharedStorage(long DataPointer, IReadOnlyList<string> Names);

/// <summary>Measured figures from real tensors, for the <c>--load-model</c> report.</summary>
public static class Measurements
{
    public static ParameterCounts CountParameters(CausalLm model)
    {
        long total = 0, trainable = 0, totalBytes = 0, trainableBytes = 0;
        foreach (var (_, p) in model.NamedParameters())
        {
            long n = p.numel(), b = n * p.ElementSize;
            total += n; totalBytes += b;
            if (p.requires_grad) { trainable += n; trainableBytes += b; }
        }
        return new ParameterCounts(total, trainable, totalBytes, trainableBytes);
    }

    /// <summary>Storage base pointer of a tensor (views of one buffer share it).</summary>
    public static long DataPointer(Tensor t) => t.dtype switch
    {
        ScalarType.Float32 => (long)t.storage<float>().data_ptr(),
        ScalarType.Float64 => (long)t.storage<double>().data_ptr(),
        ScalarType.Int64 => (long)t.storage<long>().data_ptr(),
        ScalarType.Int32 => (long)t.storage<int>().data_ptr(),
        // TorchSharp's typed Storage<T> has no BFloat16 (and refuses Half): ask LibTorchSharp for the storage pointer.
        _ => NativeStorage.DataPointer(t),
    };

    /// <summary>Groups of named tensors (parameters by default, or adapter tensors) that share a storage.</summary>
    public static IReadOnlyList<SharedStorage> FindSharedStorage(IEnumerable<(string Name, Tensor Tensor)> tensors) =>
        tensors.GroupBy(t => DataPointer(t.Tensor))
            .Where(g => g.Count() > 1)
            .Select(g => new SharedStorage(g.Key, g.Select(x => x.Name).ToList()))
            .ToList();

    /// <summary>Adapter tensors of an injected LoRA under PEFT's run-time names, for sharing checks.</summary>
    public static IEnumerable<(string Name, Tensor Tensor)> AdapterTensors(CausalLm model) =>
        LoraInjector.PeftNamedParameters(model).Select(p => (p.Name, (Tensor)p.Param));

    /// <summary>Bytes held by the given hidden states, counting each distinct storage once.</summary>
    public static long RetainedBytes(IEnumerable<Tensor> tensors) =>
        tensors.GroupBy(DataPointer).Sum(g => g.Max(t => t.numel() * t.ElementSize));

    /// <summary>Peak resident memory of this process (VmHWM on Linux, else the peak working set).</summary>
    public static long ProcessPeakBytes()
    {
        if (OperatingSystem.IsLinux())
            foreach (var line in File.ReadLines("/proc/self/status"))
                if (line.StartsWith("VmHWM:", StringComparison.Ordinal))
                    return Runtime.DeviceMemory.ProcKiBToBytes(line);
        return System.Diagnostics.Process.GetCurrentProcess().PeakWorkingSet64;
    }

    /// <summary>
    /// Which experts the router selected per MoE layer (top-k of the logits; monotone for softmax routers,
    /// so exact there; for DeepSeek the correction bias and groups can change the choice).
    /// Counts over positions where <paramref name="attentionMask"/> is 1.
    /// </summary>
    public static IReadOnlyList<long[]> SelectedExpertCounts(IReadOnlyList<Tensor> routerLogits, int topK, Tensor attentionMask)
    {
        var keep = attentionMask.reshape(-1).to(ScalarType.Bool);
        var result = new List<long[]>();
        foreach (var l in routerLogits)
        {
            using var scope = NewDisposeScope();
            var idx = l.topk(topK, -1).indexes.index(keep).flatten();
            result.Add(Nn.ExpertCounts.Read(idx, l.shape[^1]));
        }
        return result;
    }
}
