using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Sources.Analysis;
using MoeLora.Sources.Safetensors;
using MoeLora.Sources.Tests.Support;

namespace MoeLora.Sources.Tests;

/// <summary>Analysis from checkpoint headers alone, checked against Core's analysis of the same tiny models.</summary>
public class DerivedModelTests
{
    // See CrossCheckTests: Core currently misreads this config's expert count.
    public static TheoryData<string> TinyModels() => [.. TestEnv.TinyModelTypes];

    [Theory]
    [MemberData(nameof(TinyModels))]
    public void Headers_alone_recover_layers_experts_and_linear_layers(string modelType)
    {
        Checkpoint checkpoint = CrossCheckTests.Read(modelType);
        string configPath = Path.Combine(TestEnv.TinyDir(modelType), "config.json");
        ModelConfig config = ModelConfig.Parse(File.ReadAllText(configPath), configPath);
        ModelSpec v4 = ArchitectureRegistry.Build(config, Layout.V4);
        ModelSpec v5 = ArchitectureRegistry.Build(config, Layout.V5);

        DerivedModel derived = CheckpointModelDeriver.Derive(checkpoint, "unknown_type");

        Assert.Equal(v5.NumHiddenLayers, derived.NumLayers);
        Assert.Equal(v5.Moe.IsMoe ? v5.Moe.NumExperts : 0, derived.NumExperts);
        Assert.Equal(v5.Moe.IsMoe ? v5.Moe.MoeLayers : [], derived.MoeLayers);
        Assert.Equal(checkpoint.ElementCount, derived.Tree.Modules.SelectMany(m => m.Parameters).Sum(p => p.NumElements));
        // The stored Linear layers are exactly the legacy-layout Linear modules (checkpoints keep those names). Routers
        // are compared apart: some are nn.Linear, some are not, and headers cannot tell which.
        var storedLinears = v4.Tree.Modules.Where(m => m.Kind == ModuleKind.Linear && m.Location != ModuleLocation.Router && m.Parameters.Any(p => !p.IsTied)).Select(m => m.Name);
        Assert.Equal(storedLinears.Order(), derived.Tree.Modules.Where(m => m.Kind == ModuleKind.Linear && m.Location != ModuleLocation.Router).Select(m => m.Name).Order());
        Assert.Equal(
            v4.Tree.Modules.Where(m => m.Location == ModuleLocation.Router && m.Parameters.Count > 0).Select(m => m.Name).Order(),
            derived.Tree.Modules.Where(m => m.Location == ModuleLocation.Router && m.Kind != ModuleKind.Container).Select(m => m.Name).Order());
        Assert.Equal(
            v4.Tree.Modules.Where(m => m.Kind == ModuleKind.Experts).Select(m => m.Name).Order(),
            derived.Tree.Modules.Where(m => m.Kind == ModuleKind.Experts).Select(m => m.Name).Order());
        Assert.Contains(DerivedModel.Label, derived.Notes[0], StringComparison.Ordinal);
        Assert.Contains(derived.Notes, n => n.Contains("model.embed_tokens", StringComparison.Ordinal));
    }

    [Fact]
    public void An_unknown_moe_checkpoint_is_derived_and_every_guess_is_noted()
    {
        byte[] file = SafetensorsBuilder.Build(
        [
            ("transformer.wte.weight", SafetensorsDtype.BF16, [100, 16]),
            ("transformer.layers.0.attention.qkv.weight", SafetensorsDtype.BF16, [48, 16]),
            ("transformer.layers.0.moe.router.weight", SafetensorsDtype.BF16, [3, 16]),
            ("transformer.layers.0.moe.experts.0.fc1.weight", SafetensorsDtype.BF16, [32, 16]),
            ("transformer.layers.0.moe.experts.1.fc1.weight", SafetensorsDtype.BF16, [32, 16]),
            ("transformer.layers.0.moe.experts.2.fc1.weight", SafetensorsDtype.BF16, [32, 16]),
            ("transformer.layers.0.norm.weight", SafetensorsDtype.BF16, [16]),
            ("transformer.layers.1.moe.experts.w_in", SafetensorsDtype.BF16, [3, 16, 32]),
            ("transformer.layers.1.rope.scale", SafetensorsDtype.F32, []),
        ]);
        var checkpoint = new Checkpoint([new CheckpointFile("model.safetensors", SafetensorsReader.ReadHeader(file))], null, "<test>");

        DerivedModel model = CheckpointModelDeriver.Derive(checkpoint, "mystery_moe");

        Assert.Equal(2, model.NumLayers);
        Assert.Equal(3, model.NumExperts);
        Assert.Equal([0, 1], model.MoeLayers);
        ModuleNode expert = model.Tree.Find("transformer.layers.0.moe.experts.1.fc1")!;
        Assert.Equal((ModuleKind.Linear, ModuleLocation.RoutedExpert, 16L, 32L), (expert.Kind, expert.Location, expert.InFeatures, expert.OutFeatures));
        Assert.Equal(3, model.Tree.Find("transformer.layers.0.moe.experts")!.NumExperts);
        Assert.Equal(ModuleLocation.Router, model.Tree.Find("transformer.layers.0.moe.router")!.Location);
        Assert.Equal(ModuleKind.Experts, model.Tree.Find("transformer.layers.1.moe.experts")!.Kind);
        Assert.Equal(ModuleKind.Embedding, model.Tree.Find("transformer.wte")!.Kind);
        Assert.Equal(ModuleLocation.Attention, model.Tree.Find("transformer.layers.0.attention.qkv")!.Location);
        Assert.Contains(model.Notes, n => n.Contains("mystery_moe", StringComparison.Ordinal) && n.Contains(DerivedModel.Label, StringComparison.Ordinal));
        Assert.Contains(model.Notes, n => n.Contains("(E, out, in) or (E, in, out) cannot be told", StringComparison.Ordinal));
        Assert.Contains(model.Notes, n => n.Contains("routers", StringComparison.Ordinal));
        Assert.Contains(model.Notes, n => n.Contains("no output head", StringComparison.Ordinal));
        Assert.Contains(model.Notes, n => n.Contains("transformer.layers.1.rope.scale", StringComparison.Ordinal));
    }
}
