using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Sources.Analysis;
using MoeLora.Sources.Safetensors;
using MoeLora.Sources.Tests.Support;

namespace MoeLora.Sources.Tests;

public class CrossCheckTests
{
    public static TheoryData<string, string> TinyModelsAndLayouts()
    {
        var data = new TheoryData<string, string>();
        foreach (string type in TestEnv.TinyModelTypes)
        {
            data.Add(type, "v5");
            data.Add(type, "v4");
        }
        return data;
    }

    [Theory]
    [MemberData(nameof(TinyModelsAndLayouts))]
    public void The_tiny_checkpoints_agree_with_the_analysis_in_both_layouts(string modelType, string layout)
    {
        ModelSpec spec = Spec(modelType, LayoutNames.Parse(layout));
        Checkpoint checkpoint = Read(modelType);

        CrossCheckReport report = CheckpointCrossCheck.Run(spec, checkpoint);

        Assert.True(report.IsClean, string.Join("\n", report.Problems.Select(p => $"{p.Name}: {p.Status} {p.Detail}")
            .Concat(report.Unexpected.Select(t => $"unexpected {t.Name}"))));
        Assert.Equal(checkpoint.SizeOnDisk, report.SizeOnDisk);
        Assert.Equal(SafetensorsDtype.F32, Assert.Single(report.Dtypes).Dtype);
        // Every stored tensor is accounted for, and stored elements equal the analysed parameter count.
        long stored = checkpoint.Tensors.Where(t => !report.NotParameters.Contains(t)).Sum(t => t.Tensor.ElementCount);
        Assert.Equal(spec.Tree.NumParameters, stored);
    }

    [Fact]
    public void Per_expert_checkpoint_tensors_map_to_fused_transformers_5_parameters_and_back()
    {
        Checkpoint checkpoint = Read("mixtral");

        CrossCheckReport v5 = CheckpointCrossCheck.Run(Spec("mixtral", Layout.V5), checkpoint);
        ParameterCheck gateUp = v5.Parameters.Single(p => p.Name == "model.layers.1.mlp.experts.gate_up_proj");
        Assert.Equal(
            Enumerable.Range(0, 4).SelectMany(e => new[] { $"model.layers.1.block_sparse_moe.experts.{e}.w1.weight", $"model.layers.1.block_sparse_moe.experts.{e}.w3.weight" }),
            gateUp.StoredAs);
        Assert.Equal(["model.layers.1.block_sparse_moe.gate.weight"], v5.Parameters.Single(p => p.Name == "model.layers.1.mlp.gate.weight").StoredAs);
        Assert.Equal("model.layers.1.mlp.experts.down_proj", v5.RuntimeNameOf["model.layers.1.block_sparse_moe.experts.2.w2.weight"]);

        // A checkpoint saved with fused names still checks out against a v4 analysis.
        Checkpoint fused = Rename(checkpoint, v5);
        CrossCheckReport v4 = CheckpointCrossCheck.Run(Spec("mixtral", Layout.V4), fused);
        Assert.True(v4.IsClean);
        Assert.Equal(["model.layers.0.mlp.experts.gate_up_proj"], v4.Parameters.Single(p => p.Name == "model.layers.0.block_sparse_moe.experts.3.w3.weight").StoredAs);
    }

    [Fact]
    public void Deepseek_score_correction_bias_is_reported_as_stored_but_not_a_parameter()
    {
        CrossCheckReport report = CheckpointCrossCheck.Run(Spec("deepseek_v3", Layout.V5), Read("deepseek_v3"));
        Assert.NotEmpty(report.NotParameters);
        Assert.All(report.NotParameters, t => Assert.EndsWith("mlp.gate.e_score_correction_bias", t.Name, StringComparison.Ordinal));
    }

    [Fact]
    public void Missing_experts_wrong_shapes_and_stray_tensors_are_reported()
    {
        Checkpoint original = Read("olmoe");
        var tensors = original.Tensors.Select(t => t.Tensor).ToList();
        tensors.RemoveAll(t => t.Name == "model.layers.0.mlp.experts.2.up_proj.weight");
        int q = tensors.FindIndex(t => t.Name == "model.layers.1.self_attn.q_proj.weight");
        tensors[q] = tensors[q] with { Shape = [tensors[q].Shape[0] / 2, tensors[q].Shape[1] * 2] };
        tensors.Add(new SafetensorsTensor("vision_tower.proj.weight", SafetensorsDtype.BF16, [2, 2], 0, 8));
        Checkpoint tampered = Rebuild(tensors);

        CrossCheckReport report = CheckpointCrossCheck.Run(Spec("olmoe", Layout.V5), tampered);

        Assert.False(report.IsClean);
        ParameterCheck experts = report.Problems.Single(p => p.Name == "model.layers.0.mlp.experts.gate_up_proj");
        Assert.Equal(ParameterCheckStatus.Missing, experts.Status);
        Assert.Contains("model.layers.0.mlp.experts.2.up_proj.weight", experts.Detail, StringComparison.Ordinal);
        ParameterCheck query = report.Problems.Single(p => p.Name == "model.layers.1.self_attn.q_proj.weight");
        Assert.Equal(ParameterCheckStatus.ShapeMismatch, query.Status);
        Assert.Equal("vision_tower.proj.weight", Assert.Single(report.Unexpected).Name);
    }

    private static ModelSpec Spec(string modelType, Layout layout)
    {
        string path = Path.Combine(TestEnv.TinyDir(modelType), "config.json");
        return ArchitectureRegistry.Build(ModelConfig.Parse(File.ReadAllText(path), path), layout);
    }

    internal static Checkpoint Read(string modelType) =>
        CheckpointReader.TryReadAsync(new DirectoryCheckpointStore(TestEnv.TinyDir(modelType))).GetAwaiter().GetResult()!;

    // A checkpoint with the given tensors laid out contiguously (only headers matter here).
    private static Checkpoint Rebuild(IEnumerable<SafetensorsTensor> tensors)
    {
        long offset = 0;
        var placed = new List<SafetensorsTensor>();
        foreach (SafetensorsTensor t in tensors)
        {
            long bytes = t.Shape.Aggregate(1L, (a, b) => a * b) * t.Dtype.Bits() / 8;
            placed.Add(t with { DataBegin = offset, DataEnd = offset + bytes });
            offset += bytes;
        }
        var header = new SafetensorsHeader(placed, new Dictionary<string, string>(), 0, offset);
        return new Checkpoint([new CheckpointFile("model.safetensors", header)], null, "<test>");
    }

    // Stores the checkpoint as transformers 5 would with save_original_format=False: fused names and shapes.
    private static Checkpoint Rename(Checkpoint checkpoint, CrossCheckReport v5) =>
        Rebuild(v5.Parameters.Where(p => p.Status == ParameterCheckStatus.Match)
            .Select(p => new SafetensorsTensor(p.Name, SafetensorsDtype.F32, p.Shape.ToArray(), 0, 0))
            .Concat(v5.NotParameters.Select(t => t.Tensor)));
}
