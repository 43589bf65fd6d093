using System.Text.Json.Nodes;
using MoeLora.Torch.Models;
using MoeLora.Torch.Tests.Training;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// DeepSeek-OCR-2 run on text, as transformers 5.17's DeepseekOcr2ForConditionalGeneration runs given only input_ids,
/// before a transformers fixture exists: the hand-written tiny config of Data/handwritten (text layers sparse, dense,
/// sparse by mlp_layer_types; SAM and Qwen2 encoder towers), its inert towers and view_separator, its text path against
/// the fixture-checked Llama runtime where the math coincides, left padding, and LoRA gradients.
/// </summary>
public class DeepseekOcr2Tests
{
    public DeepseekOcr2Tests() => TorchRuntime.EnsureInitialized();

    static JsonObject Config() => JsonNode.Parse(File.ReadAllText(
        Path.Combine(AppContext.BaseDirectory, "Data", "handwritten", "deepseek_ocr2.json")))!.AsObject();

    static string With(Action<JsonObject> text)
    {
        var config = Config();
        text(config["text_config"]!.AsObject());
        return config.ToJsonString();
    }

    [Fact]
    public void ViewSeparatorIsModelsOwnFrozenParameterAndTheTowersAreInert()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config().ToJsonString(), 0));
        var (name, p) = h.Model.NamedParameters().First();
        Assert.Equal("model.view_separator", name);
        Assert.Equal(new long[] { 64 }, p.shape);
        Assert.False(p.requires_grad);
        Assert.Equal(["model.vision_tower", "model.multi_modal_projector"], h.Model.Towers.Select(t => t.Prefix));
        Assert.Equal("model.language_model", h.Model.Runtime.Towers!.TextModel);

        // Neither the towers nor view_separator take part in a text-only forward: changing them changes no logit.
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var _ = no_grad();
        using var before = h.Model.Forward(ids, mask);
        foreach (var (n, t) in h.Model.NamedParameters())
            if (n == "model.view_separator" || n.StartsWith("model.vision_tower.", StringComparison.Ordinal)
                || n.StartsWith("model.multi_modal_projector.", StringComparison.Ordinal))
                t.add_(1.0);
        using var after = h.Model.Forward(ids, mask);
        Assert.True(before.Logits.bytes.SequenceEqual(after.Logits.bytes));
    }

    [Fact]
    public void MlpLayerTypesChooseTheSparseLayers()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config().ToJsonString(), 0));
        var names = h.Model.NamedParameters().Select(p => p.Name).ToHashSet();
        Assert.Contains("model.language_model.layers.0.mlp.experts.gate_up_proj", names);
        Assert.Contains("model.language_model.layers.1.mlp.gate_proj.weight", names);
        Assert.Contains("model.language_model.layers.2.mlp.shared_experts.down_proj.weight", names);
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var _ = no_grad();
        using var o = h.Model.Forward(ids, mask);
        // Router logits of the two sparse layers, one row per token over the 4 experts.
        Assert.Equal(2, o.RouterLogits.Count);
        Assert.All(o.RouterLogits, r => Assert.Equal(new long[] { 2 * 9, 4 }, r.shape));
    }

    // With every layer dense, DeepSeek-OCR-2's text model is a Llama decoder (q/k/v/o with attention_bias, rotate_half
    // rope over head_dim = hidden / heads, RMSNorms, SiLU gated MLP): on the same weights the logits must be Llama's.
    [Fact]
    public void AllDenseTextPathEqualsLlamaOnTheSameWeights()
    {
        var ocr = With(t => t["mlp_layer_types"] = new JsonArray("dense", "dense", "dense"));
        const string llama = """
            {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "attention_bias": true, "rms_norm_eps": 1e-6,
             "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": false}
            """;
        using var want = new DisposableModel(TorchModelFactory.Random(llama, 7));
        using var got = new DisposableModel(TorchModelFactory.Random(ocr, 8));
        var source = want.Model.NamedParameters().ToDictionary(p => p.Name, p => p.Param);
        var copied = 0;
        using (no_grad())
            foreach (var (n, p) in got.Model.NamedParameters())
            {
                var llamaName = n.StartsWith("model.language_model.", StringComparison.Ordinal) ? "model." + n["model.language_model.".Length..]
                    : n == "lm_head.weight" ? n : null;
                if (llamaName is null) continue;
                p.copy_(source[llamaName]);
                copied++;
            }
        Assert.Equal(source.Count, copied);
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var _ = no_grad();
        using var a = want.Model.Forward(ids, mask, outputHiddenStates: true);
        using var b = got.Model.Forward(ids, mask, outputHiddenStates: true);
        Assert.Equal(a.HiddenStates.Count, b.HiddenStates.Count);
        Assert.True(a.Logits.bytes.SequenceEqual(b.Logits.bytes));
    }

    public static TheoryData<string> Configs() => new()
    {
        Config().ToJsonString(),
        With(t => { t["topk_method"] = "group_limited_greedy"; t["n_group"] = 2; t["topk_group"] = 1; }),
    };

    // Rope is relative and nothing else reads absolute positions (the text model's positions are 0..S-1, no image
    // tokens): a left-padded row gives what its tokens give alone.
    [Theory]
    [MemberData(nameof(Configs))]
    public void LeftPaddedRowEqualsTheRowAlone(string config) => RuntimeChecks.PaddedRowEqualsTheRowAlone(config);

    // LoRA on every Linear (the towers' included, as PEFT injects them) and on the experts: one backward of a left-padded
    // batch gives every text adapter a finite non-zero gradient and the never-run towers' adapters none.
    [Theory]
    [MemberData(nameof(Configs))]
    public void LoraGradientsReachEveryTextAdapterAndNoTowerAdapter(string config)
    {
        using var h = new DisposableModel(TorchModelFactory.Random(config, 3));
        var lora = RuntimeChecks.InjectWithNonZeroB(h.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "lin1"],
             "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
            """);
        static bool Tower(string name) => name.Contains(".vision_tower.", StringComparison.Ordinal);
        Assert.Contains(lora, p => Tower(p.Name) && p.Name.Contains("sam_encoder.layers.1.attn.qkv.lora_A", StringComparison.Ordinal));
        Assert.Contains(lora, p => Tower(p.Name) && p.Name.Contains("vision_encoder.layers.0.self_attn.q_proj.lora_A", StringComparison.Ordinal));
        Assert.Contains(lora, p => p.Name.Contains("language_model.layers.0.mlp.experts.lora_A", StringComparison.Ordinal));
        Assert.Contains(lora, p => p.Name.Contains("language_model.layers.1.mlp.gate_proj.lora_A", StringComparison.Ordinal));
        Assert.Contains(lora, p => p.Name.Contains("language_model.layers.2.mlp.shared_experts.up_proj.lora_B", StringComparison.Ordinal));
        RuntimeChecks.AssertGradients(RuntimeChecks.Backward(h.Model, lora).Grads, Tower);
    }

    /// <summary>
    /// transformers 5.17's save_pretrained writes DeepSeek-OCR-2 in the original checkpoint's names (Core's V4 layout:
    /// model.sam_model, model.qwen2_model, model.projector, model.view_seperator, the language model at model.* with
    /// per-expert MLPs), as the coming transformers fixture will be: a random model written that way loads back equal.
    /// </summary>
    [Fact]
    public void ACheckpointInTheOriginalLayoutLoadsBack()
    {
        var config = Config().ToJsonString();
        using var original = new DisposableModel(TorchModelFactory.Random(config, 7));
        var spec = original.Model.Spec;
        var layout = Core.Modules.CheckpointLayout.For(spec)!;
        var diskNames = Core.Architectures.ArchitectureRegistry.Build(spec.Config, Core.Modules.Layout.V4).Tree.Parameters
            .Select(p => p.Name).ToHashSet();
        var stored = new Dictionary<string, Tensor>();
        foreach (var (name, t) in original.Model.StateDict())
        {
            var alt = layout.For(name);
            if (alt is null) stored[name] = t;
            else if (alt.IsStack)
                foreach (var (part, expert, row) in alt.Pieces()) stored[part.Name] = t[expert].narrow(0, row, part.Shape[0]).contiguous();
            else stored[alt.Parts.Single().Name] = t;
        }
        Assert.Equal(diskNames.Order(StringComparer.Ordinal), stored.Keys.Order(StringComparer.Ordinal));
        Assert.Contains("model.view_seperator", stored.Keys);
        Assert.Contains("model.layers.2.mlp.experts.3.up_proj.weight", stored.Keys);
        Assert.Contains("model.layers.1.mlp.gate_proj.weight", stored.Keys);

        using var dir = new TempDir();
        File.WriteAllText(Path.Combine(dir.Path, "config.json"), config);
        IO.Safetensors.Save(Path.Combine(dir.Path, "model.safetensors"), stored.Select(kv => new KeyValuePair<string, Tensor>(kv.Key, kv.Value)));
        using var loaded = new DisposableModel(TorchModelFactory.Load(dir.Path));
        var loadedState = loaded.Model.StateDict().ToDictionary(x => x.Name, x => x.Value);
        Assert.All(original.Model.StateDict(), x => Assert.True(x.Value.eq(loadedState[x.Name]).all().item<bool>(), $"{x.Name} differs"));
    }

    [Theory]
    [InlineData("noaux_tc", "topk_method 'noaux_tc'")]
    [InlineData(null, "without num_experts_per_tok")]
    public void ConfigsTransformersCannotRouteAreRefusedInOneLine(string? method, string reason)
    {
        var config = With(t =>
        {
            if (method is null) t.Remove("num_experts_per_tok");
            else t["topk_method"] = method;
        });
        var e = Assert.Throws<NotSupportedException>(() => TorchModelFactory.Random(config, 0));
        Assert.Contains(reason, e.Message, StringComparison.Ordinal);
        Assert.DoesNotContain('\n', e.Message);
    }
}
