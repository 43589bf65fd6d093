using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Tests;

/// <summary>
/// ERNIE 4.5 VL MoE has no oracle entry yet (transformers 5.17 cannot build the shrunk config the oracle had; see
/// tools/oracle/discover_moe.py's OVERRIDES). Until it has one, this checks what its modeling source states outright
/// for the config class defaults (Ernie4_5_VLMoeTextConfig / Ernie4_5_VLMoeVisionConfig).
/// </summary>
public class Ernie45VLMoeDefaultTests
{
    private static ModelSpec Build(Layout layout, Action<JsonObject>? edit = null)
    {
        var json = new JsonObject { ["model_type"] = "ernie4_5_vl_moe" };
        edit?.Invoke(json);
        return ArchitectureRegistry.Build(new ModelConfig(json), layout);
    }

    private static long[] Shape(ModelSpec spec, string name) =>
        spec.Tree.Parameters.Single(p => p.Name == name).Shape;

    [Fact]
    public void Default_config_has_the_modality_isolated_moe_layers()
    {
        var spec = Build(Layout.V5);
        Assert.Equal("Ernie4_5_VLMoeForConditionalGeneration", spec.Architecture);
        // mlp_layer_types defaults to ["dense"] + ["sparse"] * 27.
        Assert.Equal([0], spec.Moe.DenseLayers);
        Assert.Equal(Enumerable.Range(1, 27), spec.Moe.MoeLayers);
        const string L = "model.language_model.layers.";
        Assert.Equal([12288, 2560], Shape(spec, L + "0.mlp.gate_proj.weight"));
        // moe_intermediate_size [1536, 512]: text experts 1536 wide, vision experts 512; 64 of each.
        Assert.Equal([64, 2 * 1536, 2560], Shape(spec, L + "1.mlp.text_moe.experts.gate_up_proj"));
        Assert.Equal([64, 2560, 1536], Shape(spec, L + "1.mlp.text_moe.experts.down_proj"));
        Assert.Equal([64, 2 * 512, 2560], Shape(spec, L + "1.mlp.vision_moe.experts.gate_up_proj"));
        Assert.Equal([64, 2560, 512], Shape(spec, L + "1.mlp.vision_moe.experts.down_proj"));
        Assert.Equal([64, 2560], Shape(spec, L + "27.mlp.vision_moe.gate.weight"));
        Assert.Equal([1, 64], Shape(spec, L + "27.mlp.text_moe.gate.moe_statics.e_score_correction_bias"));
        // Two shared experts of the text width, fused into one MLP.
        Assert.Equal([2 * 1536, 2560], Shape(spec, L + "1.mlp.shared_experts.gate_proj.weight"));
        Assert.True(spec.Tree.Find("lm_head")!.Parameters.Single().IsTied);
        Assert.Equal(6, spec.Moe.ExpertsPerToken);
        Assert.Null(spec.RuntimeUnavailable);
        Assert.NotNull(spec.Runtime);
    }

    /// <summary>
    /// Text only: sparse layers run text_moe (then the shared expert) with vision_moe built beside it, dense layers the
    /// dense MLP; the towers sit around the text model in registration order; the rope is ERNIE 4.5's over head_dim.
    /// </summary>
    [Fact]
    public void Runtime_runs_the_text_experts_with_the_vision_ones_inert()
    {
        var runtime = Build(Layout.V5).Runtime!;
        Assert.IsType<GatedMlpSettings>(runtime.Layers[0].FeedForward);
        var moe = Assert.IsType<ModalityIsolatedMoeSettings>(runtime.Layers[1].FeedForward);
        Assert.Equal(("text_moe", "vision_moe"), (moe.TextName, moe.VisionName));
        Assert.Equal((1536, 512), (moe.Text.Experts.Intermediate, moe.Vision.Experts.Intermediate));
        Assert.Equal(1e-12, Assert.IsType<SoftmaxStaticsTopKRouterSettings>(moe.Text.Router).NormMin);
        Assert.Null(moe.Text.Shared);
        Assert.Equal(2 * 1536, moe.Shared!.Intermediate);
        Assert.Equal(["model.language_model", "model.vision_tower", "model.resampler_model", "lm_head"], runtime.Towers!.Order);
        Assert.Equal(("default", 500000.0, 128L), (runtime.Rope.Type, runtime.Rope.Theta, runtime.Rope.Dim));
        Assert.False(runtime.LmHeadBias);
    }

    /// <summary>transformers' Ernie4_5_VLMoeTextRotaryEmbedding cannot be built for these: no runtime, the reason named.</summary>
    [Theory]
    [InlineData("linear", "[22, 22, 20]", "rope type 'linear'")]
    [InlineData("default", "[20, 24, 20]", "mrope_section [20, 24, 20]")]
    [InlineData("default", "[32, 32, 0]", "mrope_section [32, 32, 0]")]
    [InlineData("default", "[22, 22, 22]", "mrope_section [22, 22, 22]")]
    [InlineData("default", "[32, 32]", "mrope_section [32, 32]")]
    public void Runtime_is_refused_where_transformers_cannot_build_the_rope(string type, string sections, string reason)
    {
        var spec = Build(Layout.V5, c => c["rope_parameters"] = JsonNode.Parse($$"""{"rope_type": "{{type}}", "factor": 2.0, "mrope_section": {{sections}}}"""));
        Assert.Null(spec.Runtime);
        Assert.Contains(reason, spec.RuntimeUnavailable);
    }

    [Fact]
    public void Default_vision_tower_and_resampler()
    {
        var spec = Build(Layout.V5);
        Assert.Equal(32, spec.Tree.Modules.Count(m => m.ClassName == "Ernie4_5_VLMoeVisionBlock"));
        Assert.Equal([1280, 3 * 14 * 14], Shape(spec, "model.vision_tower.patch_embed.proj.weight"));
        Assert.Equal([3 * 1280, 1280], Shape(spec, "model.vision_tower.blocks.31.attn.qkv.weight"));
        Assert.Equal([5120, 1280], Shape(spec, "model.vision_tower.blocks.0.mlp.fc1.weight"));
        // spatial_merge_size 2 (4 patches of 1280), temporal_merge_size 2.
        Assert.Equal([5120, 5120], Shape(spec, "model.resampler_model.spatial_linear.fc1.weight"));
        Assert.Equal([5120, 10240], Shape(spec, "model.resampler_model.temporal_linear.fc1.weight"));
        Assert.Equal([2560, 5120], Shape(spec, "model.resampler_model.mlp.weight"));
    }

    /// <summary>The checkpoint conversion only renames, transposes, splits and concatenates: both layouts hold the same elements.</summary>
    [Fact]
    public void Both_layouts_hold_the_same_number_of_elements()
    {
        var v5 = Build(Layout.V5);
        var v4 = Build(Layout.V4);
        Assert.Equal(v5.Tree.NumParameters, v4.Tree.NumParameters);
        Assert.Equal(2 * 64, v4.Tree.Modules.Count(m => m.Name.StartsWith("model.layers.1.mlp.experts.", StringComparison.Ordinal)
            && m.Name.Count(ch => ch == '.') == 5));
    }

    /// <summary>
    /// transformers' ErnieFuseAndSplitTextVisionExperts splits the checkpoint's one per-expert list in halves: experts
    /// 0..63 stack into text_moe's fused tensors, 64..127 into vision_moe's.
    /// </summary>
    [Fact]
    public void Text_experts_come_first_in_the_checkpoint_list()
    {
        var layout = CheckpointLayout.For(Build(Layout.V5))!;
        const string L = "model.language_model.layers.5.mlp.";
        var text = layout.For(L + "text_moe.experts.gate_up_proj")!;
        var vision = layout.For(L + "vision_moe.experts.gate_up_proj")!;
        Assert.Equal(64, vision.NumExperts);
        Assert.Equal("model.layers.5.mlp.experts.0.gate_proj.weight", text.Parts[0].Name);
        Assert.Equal("model.layers.5.mlp.experts.63.up_proj.weight", text.Parts[^1].Name);
        Assert.Equal("model.layers.5.mlp.experts.64.gate_proj.weight", vision.Parts[0].Name);
        Assert.Equal("model.layers.5.mlp.experts.127.up_proj.weight", vision.Parts[^1].Name);
        Assert.All(vision.Parts, p => Assert.Equal([512, 2560], p.Shape));
        Assert.Equal("model.layers.5.mlp.experts.64.down_proj.weight", layout.For(L + "vision_moe.experts.down_proj")!.Parts[0].Name);
    }

    /// <summary>
    /// transformers' conversion: <c>Transpose(0, 1)</c> of gate.weight into text_moe's router and of gate.weight_1 into
    /// vision_moe's; <c>Chunk(dim=0)</c> of the [2, E] moe_statics, row 0 to text_moe's, row 1 to vision_moe's.
    /// </summary>
    [Fact]
    public void Routers_pair_transposed_and_the_statics_by_rows()
    {
        var layout = CheckpointLayout.For(Build(Layout.V5))!;
        const string L = "model.language_model.layers.3.mlp.";
        var text = layout.For(L + "text_moe.gate.weight")!;
        var vision = layout.For(L + "vision_moe.gate.weight")!;
        Assert.True(text.Transposed && vision.Transposed);
        Assert.Equal("model.layers.3.mlp.gate.weight", Assert.Single(text.Parts).Name);
        Assert.Equal("model.layers.3.mlp.gate.weight_1", Assert.Single(vision.Parts).Name);
        Assert.Equal([2560, 64], text.Parts[0].Shape);
        var textStatics = layout.For(L + "text_moe.gate.moe_statics.e_score_correction_bias")!;
        var visionStatics = layout.For(L + "vision_moe.gate.moe_statics.e_score_correction_bias")!;
        Assert.Equal("model.layers.3.mlp.moe_statics.e_score_correction_bias", Assert.Single(textStatics.Parts).Name);
        Assert.Equal(textStatics.Parts, visionStatics.Parts);
        Assert.Equal((0, 1), (textStatics.Chunk!.Offset, visionStatics.Chunk!.Offset));
        Assert.Equal(0, textStatics.Chunk.PermuteHeads);
        Assert.False(textStatics.Transposed || text.IsStack || text.Chunk is not null);

        // The other way round (a v4 analysis): the stored gate is the runtime's transposed, the stored statics the two
        // runtime rows concatenated.
        var back = CheckpointLayout.For(Build(Layout.V4))!;
        var gate1 = back.For("model.layers.3.mlp.gate.weight_1")!;
        Assert.True(gate1.Transposed);
        Assert.Equal(L + "vision_moe.gate.weight", Assert.Single(gate1.Parts).Name);
        var statics = back.For("model.layers.3.mlp.moe_statics.e_score_correction_bias")!;
        Assert.True(statics.Concatenated);
        Assert.Equal([L + "text_moe.gate.moe_statics.e_score_correction_bias", L + "vision_moe.gate.moe_statics.e_score_correction_bias"],
            statics.Parts.Select(p => p.Name));
    }

    /// <summary>Every runtime tensor is stored under its own name or as the layout maps it, and every stored tensor is used.</summary>
    [Theory]
    [InlineData(64)]
    [InlineData(2560)] // as many experts as the hidden size: the routers are square, told apart only by the declared transpose
    public void Every_tensor_of_both_layouts_pairs(int experts)
    {
        Action<JsonObject> edit = c => { c["moe_num_experts"] = experts; c["num_hidden_layers"] = 3; c["vision_config"] = new JsonObject { ["depth"] = 1 }; };
        var v5 = Build(Layout.V5, edit);
        var v4 = Build(Layout.V4, edit);
        var layout = CheckpointLayout.For(v5)!;
        var stored = v4.Tree.Modules.SelectMany(m => m.Parameters).Where(p => !p.IsTied).Select(p => p.Name).ToHashSet();
        var used = new HashSet<string>();
        foreach (var p in v5.Tree.Parameters.Where(p => !p.IsTied))
        {
            if (stored.Contains(p.Name)) { used.Add(p.Name); continue; }
            var alt = layout.For(p.Name);
            Assert.True(alt is not null, $"{p.Name} has no stored counterpart");
            used.UnionWith(alt.Parts.Select(x => x.Name));
        }
        Assert.Equal(stored.Order(), used.Order());
        Assert.True(layout.For("model.language_model.layers.2.mlp.text_moe.gate.weight")!.Transposed);
        Assert.Equal("model.layers.2.mlp.gate.weight_1", layout.For("model.language_model.layers.2.mlp.vision_moe.gate.weight")!.Parts[0].Name);
    }

    [Fact]
    public void Moe_intermediate_size_must_list_both_widths() =>
        Assert.Throws<ConfigException>(() => Build(Layout.V5, c => c["moe_intermediate_size"] = 1536));
}
