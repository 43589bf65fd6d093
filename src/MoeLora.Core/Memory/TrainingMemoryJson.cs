using System.Text.Json.Nodes;
using MoeLora.Core.Analysis;

namespace MoeLora.Core.Memory;

/// <summary><c>memory.training</c> of the report contract (moelora.report/1).</summary>
public static class TrainingMemoryJson
{
    public static JsonObject ToJson(TrainingMemory m)
    {
        var s = m.Setup;
        return new JsonObject
        {
            ["per_gpu_bytes"] = m.PerGpuBytes,
            ["terms"] = new JsonObject(m.Terms.Select(t => KeyValuePair.Create(t.Name, (JsonNode?)JsonValue.Create(t.Bytes)))),
            ["fits"] = m.Fits,
            ["gpu_memory_bytes"] = s.GpuMemoryBytes,
            ["usable_bytes"] = m.UsableBytes,
            ["phase"] = m.Phase,
            ["verdict"] = m.Verdict,
            ["fixes"] = new JsonArray(m.Fixes.Select(f => (JsonNode)new JsonObject
            {
                ["change"] = f.Change,
                ["per_gpu_bytes"] = f.PerGpuBytes,
                ["fits"] = f.Fits,
            }).ToArray()),
            ["formulas"] = new JsonObject(m.Terms.Select(t => KeyValuePair.Create(t.Name, (JsonNode?)new JsonObject
            {
                ["formula"] = t.Formula,
                ["source"] = t.Source,
            }))),
            ["setup"] = new JsonObject
            {
                ["mode"] = TrainingSetup.Name(s.Mode),
                ["batch_size"] = s.BatchSize,
                ["seq_length"] = s.SeqLength,
                ["dtype"] = s.DType.Name(),
                ["quantization"] = TrainingSetup.Name(s.Quantization),
                ["gradient_checkpointing"] = s.GradientCheckpointing,
                ["attention"] = TrainingSetup.Name(s.Attention),
                ["gpus"] = s.Gpus,
                ["sharding"] = TrainingSetup.Name(s.Sharding),
                ["layers_run"] = m.LayersRun,
            },
        };
    }
}
