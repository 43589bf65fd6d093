using System.IO.Compression;
using System.Text.Json.Nodes;
using MoeLora.Torch.IO;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// A multimodal model runs text only, as transformers does given only input_ids: its towers are built from Core's tree
/// (the tiny multimodal configs transformers 5.17 built for the Core oracle) but never run.
/// </summary>
[Collection(TorchGlobalRng.Name)] // a train-mode forward (dropout) may draw from torch's global RNG
public sealed class MultimodalTowerTests : IDisposable
{
    public MultimodalTowerTests() => TorchRuntime.EnsureInitialized();

    readonly string _tmp = Directory.CreateTempSubdirectory("moelora-towers-").FullName;
    public void Dispose() => Directory.Delete(_tmp, recursive: true);

    static JsonObject Config(string name = "llama4", string file = "tiny_models.json.gz")
    {
        using var gz = new GZipStream(File.OpenRead(Path.Combine(AppContext.BaseDirectory, "Data", "oracle", file)), CompressionMode.Decompress);
        var config = JsonNode.Parse(gz)!["models"]![name]!["input_config"]!.AsObject();
        if (name == "llama4") Assert.Equal("Llama4ForConditionalGeneration", config["architectures"]![0]!.GetValue<string>());
        return config;
    }

    static readonly long[][] Ids = [[3, 17, 64, 5, 99, 2, 41, 8], [0, 0, 7, 120, 33, 6, 90, 12]];

    static string Names(CausalLm m, string prefix) =>
        string.Join(",", m.NamedParameters().Where(p => p.Name.StartsWith(prefix, StringComparison.Ordinal)).Select(p => p.Name));

    [Fact]
    public void TowersHoldCoresParametersAndTheTextModelSitsUnderLanguageModel()
    {
        var config = Config();
        using var h = new DisposableModel(TorchModelFactory.Random(config.ToJsonString(), 0));
        Assert.Equal(["vision_model", "multi_modal_projector"], h.Model.Towers.Select(t => t.Prefix));
        var tree = h.Model.Spec.Tree;
        // Every Linear node of the towers is a real Linear (a LoRA target), every other tensor a plain parameter.
        var modules = h.Model.NamedModules().ToDictionary(m => m.Name, m => m.Module);
        foreach (var node in tree.Modules.Where(n => n.Name.StartsWith("vision_model.", StringComparison.Ordinal) || n.Name.StartsWith("multi_modal_projector.", StringComparison.Ordinal)))
            Assert.True(node.Kind == Core.Modules.ModuleKind.Linear ? modules[node.Name] is Linear : modules[node.Name] is InertModule, node.Name);
        Assert.Contains(modules.Keys, n => n == "language_model.model.layers.3.self_attn.q_proj");
        Assert.NotEmpty(Names(h.Model, "vision_model.model.layers.1.mlp.fc2."));
    }

    [Theory]
    [InlineData("llama4", "tiny_models.json.gz")]
    [InlineData("aria", "moe_tiny_models.json.gz")]
    [InlineData("minimax_m3_vl", "moe_tiny_models.json.gz")]
    [InlineData("qwen3_5_moe", "moe_tiny_models.json.gz")]
    [InlineData("kimi_k25", "moe_tiny_models.json.gz")]
    public void TextOnlyLogitsEqualTheTextModelsOnTheSameWeights(string name, string file)
    {
        var config = Config(name, file);
        // The oracle's qwen3_5_moe config names no class (AutoModelForCausalLM's text model): name the multimodal one.
        if (name == "qwen3_5_moe") config["architectures"] = new JsonArray("Qwen3_5MoeForConditionalGeneration");
        AssertTextOnlyLogitsEqualTheTextModels(config);
    }

    [Fact]
    public void MiniMaxM3SparseLayersRunInTheMultimodalModel()
    {
        // The oracle's tiny MiniMax-M3 has full-attention layers only: make every other one sparse, with an indexer whose
        // block selection acts on 8 tokens (blocks of 2, the best one kept plus the local one).
        var config = Config("minimax_m3_vl", "moe_tiny_models.json.gz");
        var text = config["text_config"]!.AsObject();
        var layers = (int)text["num_hidden_layers"]!.GetValue<long>();
        text["layer_types"] = new JsonArray(Enumerable.Range(0, layers).Select(i => (JsonNode)(i % 2 == 1 ? "minimax_m3_sparse" : "full_attention")).ToArray());
        text["index_n_heads"] = 2; text["index_head_dim"] = 8;
        text["index_block_size"] = 2; text["index_topk_blocks"] = 1; text["index_local_blocks"] = 1;
        var spec = TorchModelFactory.Spec(config.ToJsonString());
        Assert.NotNull(spec.Runtime);
        using (var h = new DisposableModel(TorchModelFactory.Random(config.ToJsonString(), 0)))
        {
            Assert.Equal(spec.Tree.Parameters.Select(p => $"{p.Name} [{string.Join(",", p.Shape)}]"),
                h.Model.NamedParameters().Select(p => $"{p.Name} [{string.Join(",", p.Param.shape)}]"));
            Assert.NotEmpty(Names(h.Model, "model.language_model.layers.1.self_attn.indexer."));
        }
        AssertTextOnlyLogitsEqualTheTextModels(config);
    }

    void AssertTextOnlyLogitsEqualTheTextModels(JsonObject config)
    {
        using var mm = new DisposableModel(TorchModelFactory.Random(config.ToJsonString(), 0));
        var towers = mm.Model.Runtime.Towers!;
        Assert.NotEmpty(mm.Model.Towers);
        // What the text config alone builds (the text decoder's causal LM), with other random weights, then the
        // multimodal model's text weights copied across: model.* is the text model, lm_head the head.
        using var text = new DisposableModel(TorchModelFactory.Random(config["text_config"]!.ToJsonString(), 1));
        var mmState = mm.Model.StateDict().ToDictionary(s => s.Name, s => s.Value);
        string MultimodalName(string textName) => textName.StartsWith("model.", StringComparison.Ordinal)
            ? towers.TextModel + textName["model".Length..] : towers.LmHead + textName["lm_head".Length..];
        var vocab = text.Model.VocabSize;
        using var ids = tensor(Ids.SelectMany(r => r).Select(x => x % vocab).ToArray(), [2, 8]);
        using var mask = tensor(new long[] { 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1 }, [2, 8]);
        using var _ = no_grad();
        using (var before = text.Model.Forward(ids, mask))
        using (var ref0 = mm.Model.Forward(ids, mask))
            Assert.False(before.Logits.allclose(ref0.Logits, 1e-3, 1e-3), "different weights should give different logits");
        var copied = 0;
        foreach (var (n, t) in text.Model.StateDict()) { t.copy_(mmState[MultimodalName(n)]); copied++; }
        Assert.Equal(mmState.Count - mm.Model.Towers.Sum(tw => tw.StateDict().Count()), copied);
        using var a = mm.Model.Forward(ids, mask, outputHiddenStates: true);
        using var b = text.Model.Forward(ids, mask, outputHiddenStates: true);
        Assert.True(a.Logits.bytes.SequenceEqual(b.Logits.bytes));
        Assert.Equal(b.HiddenStates.Count, a.HiddenStates.Count);
    }

    [Fact]
    public void Qwen3_5MultimodalPositionsFromTheMaskLeaveRealTokensUnchanged()
    {
        // Qwen3_5MoeModel's text-only positions are cumsum(mask) - 1 (1 at padding), not 0..S-1: a left-padded row's
        // real tokens shift by one constant, which rope (relative) and the delta rule (position-free) do not see.
        var config = Config("qwen3_5_moe", "moe_tiny_models.json.gz");
        config["architectures"] = new JsonArray("Qwen3_5MoeForConditionalGeneration");
        using var h = new DisposableModel(TorchModelFactory.Random(config.ToJsonString(), 0));
        using var ids = tensor(Ids.SelectMany(r => r).Select(x => x % h.Model.VocabSize).ToArray(), [2, 8]);
        using var mask = tensor(new long[] { 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1 }, [2, 8]);
        using var positions = (mask.cumsum(1, ScalarType.Int64) - 1).masked_fill(mask.eq(0), 1);
        using var _ = no_grad();
        using var plain = h.Model.Forward(ids, mask);
        using var shifted = h.Model.Forward(ids, mask, positionIds: positions);
        Assert.False(positions[1].equal(arange(8, ScalarType.Int64)).all().item<bool>());
        using var real = mask.to(ScalarType.Bool).unsqueeze(-1).expand_as(plain.Logits);
        Assert.True(plain.Logits.masked_select(real).allclose(shifted.Logits.masked_select(real), 1e-4, 1e-5));
        // Positions do act: swapping two tokens' positions changes the row's logits.
        using var scrambled = h.Model.Forward(ids, mask, positionIds: tensor(new long[] { 0, 2, 1, 3, 4, 5, 6, 7, 0, 0, 0, 0, 1, 2, 3, 4 }, [2, 8]));
        Assert.False(plain.Logits[0].allclose(scrambled.Logits[0], 1e-4, 1e-5));
    }

    [Fact]
    public void Glm4vMoeRunsWhereItsMropeSectionsSplitItsRotaryFrequencies()
    {
        // The oracle's tiny GLM-4.5V rotates head_dim 16 · 0.5 = 8 dims (4 frequencies), which the default mrope sections
        // 8/12/12 cannot split (torch.split in transformers' rotary embedding fails too): refused, naming the sections.
        var config = Config("glm4v_moe", "moe_tiny_models.json.gz");
        var refused = TorchModelFactory.Spec(config.ToJsonString());
        Assert.Null(refused.Runtime);
        Assert.Contains("mrope_section [8, 12, 12]", refused.RuntimeUnavailable);
        // Sections summing to 4 run, with the parameters transformers 5.17 built for this config, towers included.
        config["text_config"]!["rope_parameters"]!["mrope_section"] = new JsonArray(1, 1, 2);
        using var h = new DisposableModel(TorchModelFactory.Random(config.ToJsonString(), 0));
        Assert.Equal(["model.visual"], h.Model.Towers.Select(t => t.Prefix));
        using var gz = new GZipStream(File.OpenRead(Path.Combine(AppContext.BaseDirectory, "Data", "oracle", "moe_tiny_models.json.gz")), CompressionMode.Decompress);
        var oracle = JsonNode.Parse(gz)!["models"]!["glm4v_moe"]!["params"]!.AsArray()
            .Select(p => $"{p![0]!.GetValue<string>()} [{string.Join(",", p[1]!.AsArray().Select(x => x!.GetValue<long>()))}]");
        Assert.Equal(oracle, h.Model.NamedParameters().Select(p => $"{p.Name} [{string.Join(",", p.Param.shape)}]"));
    }

    [Fact]
    public void AdaptersLandInTheTowerAsPlannedAndGetNoGradientFromText()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config().ToJsonString(), 0));
        // init_lora_weights=false: both factors random, so every adapter the text reaches has nonzero gradients.
        var plan = LoraInjector.Plan(h.Model, """{"r": 2, "lora_alpha": 4, "init_lora_weights": false, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}""");
        var adapter = LoraInjector.Inject(h.Model, plan); // checks the trainable tensors against Core's plan
        var vision = adapter.Wrappers.Where(w => w.Module.StartsWith("vision_model.", StringComparison.Ordinal)).ToList();
        Assert.Equal(2 * 4, vision.Count); // 2 vision encoder layers × q/k/v/o
        Assert.Equal(4 * 4, adapter.Wrappers.Count(w => w.Module.StartsWith("language_model.", StringComparison.Ordinal)));
        Assert.Contains(LoraInjector.PeftNamedParameters(h.Model), p => p.Name == "base_model.model.vision_model.model.layers.1.self_attn.o_proj.lora_B.default.weight");

        h.Model.Train();
        using var ids = tensor(Ids[0], [1, 8]);
        using (var o = h.Model.Forward(ids))
        using (var loss = o.Logits.pow(2).mean())
            loss.backward();
        foreach (var (name, p) in LoraInjector.PeftNamedParameters(h.Model))
        {
            var inTower = name.StartsWith("base_model.model.vision_model.", StringComparison.Ordinal);
            // As in transformers: a module the forward never runs gets no gradient at all.
            if (inTower) Assert.True(p.grad is null || p.grad.count_nonzero().item<long>() == 0, name);
            else Assert.True(p.grad is { } g && g.count_nonzero().item<long>() > 0, name);
        }

        // Saved and loaded like any other adapter: tower adapters included, values kept.
        var dir = Path.Combine(_tmp, "adapter");
        LoraInjector.SavePeftAdapter(h.Model, adapter, dir);
        using var fresh = new DisposableModel(TorchModelFactory.Random(Config().ToJsonString(), 0));
        LoraInjector.LoadPeftAdapter(fresh.Model, dir);
        var saved = LoraInjector.PeftNamedParameters(h.Model).ToDictionary(p => p.Name, p => p.Param);
        var loaded = LoraInjector.PeftNamedParameters(fresh.Model).ToList();
        Assert.Equal(saved.Keys, loaded.Select(p => p.Name));
        Assert.All(loaded, p => Assert.True(p.Param.bytes.SequenceEqual(saved[p.Name].bytes), p.Name));
    }

    [Fact]
    public void CheckpointsFillTheTowers()
    {
        var config = Config().ToJsonString();
        var dir = Path.Combine(_tmp, "ckpt");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "config.json"), config);
        using var source = new DisposableModel(TorchModelFactory.Random(config, 3));
        Safetensors.Save(Path.Combine(dir, "model.safetensors"), source.Model.StateDict().Select(s => new KeyValuePair<string, Tensor>(s.Name, s.Value)));
        using var loaded = new DisposableModel(TorchModelFactory.Load(dir));
        var expected = source.Model.StateDict().ToDictionary(s => s.Name, s => s.Value);
        var towerNames = loaded.Model.StateDict().Where(s => s.Name.StartsWith("vision_model.", StringComparison.Ordinal) || s.Name.StartsWith("multi_modal_projector.", StringComparison.Ordinal)).ToList();
        Assert.NotEmpty(towerNames);
        Assert.All(loaded.Model.StateDict(), s => Assert.True(s.Value.bytes.SequenceEqual(expected[s.Name].bytes), s.Name));
        // A checkpoint missing a tower tensor is refused like any other missing tensor.
        Safetensors.Save(Path.Combine(dir, "model.safetensors"), source.Model.StateDict().Where(s => s.Name != "vision_model.class_embedding")
            .Select(s => new KeyValuePair<string, Tensor>(s.Name, s.Value)));
        var e = Assert.Throws<InvalidDataException>(() => TorchModelFactory.Load(dir));
        Assert.Contains("missing: vision_model.class_embedding", e.Message);
    }

    [Fact]
    public void ATruncatedLoadCutsTheTextModelAndKeepsTheTowers()
    {
        var config = Config().ToJsonString();
        var dir = Path.Combine(_tmp, "ckpt");
        Directory.CreateDirectory(dir);
        File.WriteAllText(Path.Combine(dir, "config.json"), config);
        using var source = new DisposableModel(TorchModelFactory.Random(config, 3));
        Safetensors.Save(Path.Combine(dir, "model.safetensors"), source.Model.StateDict().Select(s => new KeyValuePair<string, Tensor>(s.Name, s.Value)));
        using var cut = new DisposableModel(TorchModelFactory.LoadTruncated(dir, 2));
        Assert.Equal(2, cut.Model.NumLayers);
        var expected = source.Model.StateDict().ToDictionary(s => s.Name, s => s.Value);
        Assert.Contains(cut.Model.StateDict(), s => s.Name == "vision_model.model.layers.1.mlp.fc2.weight");
        Assert.All(cut.Model.StateDict(), s => Assert.True(s.Value.bytes.SequenceEqual(expected[s.Name].bytes), s.Name));
    }

    [Fact]
    public void KimiK25VisionQkvLoadsAsChunksOfTheStoredWqkvAndMergesBackWhole()
    {
        // The fixture is what save_pretrained writes: the vision attention fused as wqkv (transformers' Chunk(dim=0) splits
        // it into attn.q_proj, k_proj, v_proj on load) and its output projection as wo (attn.proj).
        var dir = Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe", "kimi_k25", "model");
        var stored = Safetensors.Load(Path.Combine(dir, "model.safetensors"));
        using var h = new DisposableModel(TorchModelFactory.Load(dir));
        Assert.Equal(["model.vision_tower", "model.mm_projector"], h.Model.Towers.Select(t => t.Prefix));
        var chunk = Core.Modules.CheckpointLayout.For(h.Model.Spec)!.For("model.vision_tower.layers.1.attn.k_proj.weight");
        Assert.Equal(["vision_tower.encoder.blocks.1.wqkv.weight"], chunk!.Parts.Select(p => p.Name));
        var state = h.Model.StateDict().ToDictionary(s => s.Name, s => s.Value);
        for (int i = 0; i < 2; i++)
            foreach (var tensor in new[] { "weight", "bias" })
            {
                var parts = stored[$"vision_tower.encoder.blocks.{i}.wqkv.{tensor}"].chunk(3, 0);
                string[] names = ["q_proj", "k_proj", "v_proj"];
                for (int j = 0; j < 3; j++)
                    Assert.True(state[$"model.vision_tower.layers.{i}.attn.{names[j]}.{tensor}"].bytes.SequenceEqual(parts[j].contiguous().bytes), $"layer {i} {names[j]}.{tensor}");
                Assert.True(state[$"model.vision_tower.layers.{i}.attn.proj.{tensor}"].bytes.SequenceEqual(stored[$"vision_tower.encoder.blocks.{i}.wo.{tensor}"].bytes));
            }

        // A truncated load skips the stored language model's deeper blocks (language_model.model.blocks.{i} on disk).
        using (var cut = new DisposableModel(TorchModelFactory.LoadTruncated(dir, 2)))
        {
            Assert.Equal(2, cut.Model.NumLayers);
            Assert.All(cut.Model.StateDict(), s => Assert.True(s.Value.bytes.SequenceEqual(state[s.Name].bytes), s.Name));
        }

        // With no adapter, merge writes the checkpoint back as it was stored: wqkv as its three chunks concatenated.
        var outDir = Path.Combine(_tmp, "merged");
        LoraMerge.SaveHubCheckpoint(h.Model, dir, outDir);
        var written = Safetensors.Load(Path.Combine(outDir, "model.safetensors"));
        Assert.Equal(stored.Keys.Order(StringComparer.Ordinal), written.Keys.Order(StringComparer.Ordinal));
        Assert.All(stored, s => Assert.True(s.Value.bytes.SequenceEqual(written[s.Key].bytes), s.Key));
    }

    [Fact]
    public void KimiK25EmbedsImageAndVideoPlaceholdersAsIdZero()
    {
        // Kimi_K25Model.forward sets input ids equal to image_token_id or video_token_id to 0 before the embedding, with
        // or without pixel values: a text-only row holding them is the row with zeros there.
        var config = Config("kimi_k25", "moe_tiny_models.json.gz");
        config["image_token_id"] = 5;
        config["video_token_id"] = 9;
        using var h = new DisposableModel(TorchModelFactory.Random(config.ToJsonString(), 0));
        using var ids = tensor(new long[] { 3, 5, 64, 9, 99, 2, 5, 8 }, [1, 8]);
        using var zeroed = tensor(new long[] { 3, 0, 64, 0, 99, 2, 0, 8 }, [1, 8]);
        using var _ = no_grad();
        using var a = h.Model.Forward(ids, outputHiddenStates: true);
        using var b = h.Model.Forward(zeroed, outputHiddenStates: true);
        Assert.True(a.Logits.bytes.SequenceEqual(b.Logits.bytes));
        Assert.True(a.HiddenStates[0].bytes.SequenceEqual(b.HiddenStates[0].bytes));
        // Other ids embed as themselves: 6 is not a placeholder.
        using var other = h.Model.Forward(tensor(new long[] { 3, 6, 64, 9, 99, 2, 5, 8 }, [1, 8]));
        Assert.False(other.Logits.allclose(b.Logits, 1e-4, 1e-5));
    }

    [Fact]
    public void RunningATowerIsRefusedInOneLine()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config().ToJsonString(), 0));
        using var pixels = zeros(1, 3, 28, 28);
        foreach (var tower in h.Model.Towers)
        {
            var e = Assert.Throws<NotSupportedException>(() => tower.Forward(pixels));
            Assert.StartsWith("MoeLora's runtime runs text only: pixel/audio inputs are not supported", e.Message);
            Assert.DoesNotContain('\n', e.Message);
        }
    }
}
