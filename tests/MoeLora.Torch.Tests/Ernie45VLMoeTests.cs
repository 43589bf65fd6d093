using MoeLora.Core.Modules;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Tests.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// ERNIE 4.5 VL MoE run on text (Data/handwritten/ernie4_5_vl_moe.json: layers sparse, dense, sparse, use_bias on),
/// what its transformers fixture cannot show on its own: the vision experts and towers never act, the pre-rotated rope
/// reduces to ERNIE 4.5's per-pair rope for text positions, a left-padded row equals the row alone, LoRA reaches the
/// text experts only, and a checkpoint in the saved layout (transposed routers, [2, E] statics, one expert list)
/// loads and merges back. Numerics against transformers come from its hf-moe fixture once the GPU host has made it.
/// </summary>
[Collection(TorchGlobalRng.Name)] // a train-mode forward (dropout) may draw from torch's global RNG
public sealed class Ernie45VLMoeTests
{
    public Ernie45VLMoeTests() => TorchRuntime.EnsureInitialized();

    static readonly string Config = File.ReadAllText(Path.Combine(AppContext.BaseDirectory, "Data", "handwritten", "ernie4_5_vl_moe.json"));

    const string L = "model.language_model.layers.";

    [Fact]
    public void PaddedRowEqualsTheRowAlone() => RuntimeChecks.PaddedRowEqualsTheRowAlone(Config);

    /// <summary>
    /// Text input never reaches vision_moe nor the towers: with all their parameters NaN the logits and the router
    /// logits are bitwise those of the untouched model. The router logits are text_moe's, one [B·S, E] per sparse layer.
    /// </summary>
    [Fact]
    public void VisionExpertsAndTowersNeverRun()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 2));
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var _ = no_grad();
        using var before = h.Model.Forward(ids, mask);
        Assert.Equal(2, before.RouterLogits.Count);
        Assert.All(before.RouterLogits, r => Assert.Equal(new long[] { 2 * 9, 4 }, r.shape));
        var inert = h.Model.NamedParameters().Where(p => p.Name.Contains(".vision_moe.", StringComparison.Ordinal)
            || p.Name.StartsWith("model.vision_tower.", StringComparison.Ordinal) || p.Name.StartsWith("model.resampler_model.", StringComparison.Ordinal)).ToList();
        // 2 sparse layers × (gate.weight, moe_statics, gate_up_proj, down_proj), plus the tower's and resampler's.
        Assert.Equal(2 * 4, inert.Count(p => p.Name.Contains(".vision_moe.", StringComparison.Ordinal)));
        Assert.Contains(inert, p => p.Name == "model.resampler_model.after_norm.weight");
        foreach (var (_, p) in inert) p.fill_(double.NaN);
        using var after = h.Model.Forward(ids, mask);
        Assert.True(after.Logits.bytes.SequenceEqual(before.Logits.bytes));
        for (int i = 0; i < 2; i++) Assert.True(after.RouterLogits[i].bytes.SequenceEqual(before.RouterLogits[i].bytes));
        // The text router's weight does act.
        h.Model.NamedParameters().Single(p => p.Name == L + "2.mlp.text_moe.gate.weight").Param.add_(0.5);
        using var moved = h.Model.Forward(ids, mask);
        Assert.False(moved.RouterLogits[1].allclose(before.RouterLogits[1]));
    }

    /// <summary>
    /// transformers' Ernie4_5_VLMoeTextRotaryEmbedding, written out on the plain rope's inverse frequencies (the runtime's
    /// table): the first h + w of them reordered evens then odds, angles for one position row (text positions give T, H
    /// and W the same ones), split by mrope_section, h and w stacked pairwise, t appended, each repeated for its pair.
    /// That equals cos/sin of position · inv_freq[j] on dims 2j and 2j + 1, which is what the runtime rotates by.
    /// </summary>
    [Theory]
    [InlineData(3, 2)]
    [InlineData(2, 4)]
    [InlineData(0, 8)]
    public void PreRotatedRopeOnTextPositionsIsThePlainPerPairRope(long h, long t)
    {
        var rope = TorchModelFactory.Spec(Config).Runtime!.Rope;
        Assert.Equal(16, rope.Dim);
        var rotary = Rotary.FromSettings(rope);
        var inv = rotary.InvFreq.to(ScalarType.Float32);
        Assert.Equal(2 * h + t, inv.shape[0]);
        var hw = inv[..(int)(2 * h)];
        var inv3d = cat([hw[TensorIndex.Slice(0, null, 2)], hw[TensorIndex.Slice(1, null, 2)], inv[(int)(2 * h)..]], 0);
        using var positions = arange(11, ScalarType.Int64).unsqueeze(0);
        var freqs = positions.to(ScalarType.Float32).unsqueeze(-1) * inv3d;           // [1, S, dim/2]
        var parts = freqs.split([h, h, t], -1);
        var recomposed = cat([stack([parts[0], parts[1]], -1).flatten(-2), parts[2]], -1);
        var (cos, sin) = rotary.CosSin(positions, ScalarType.Float32);                 // [1, S, dim], halves duplicated
        Assert.True(recomposed.cos().repeat_interleave(2, -1).Same(cos[.., .., ..8].repeat_interleave(2, -1)));
        Assert.True(recomposed.sin().repeat_interleave(2, -1).Same(sin[.., .., ..8].repeat_interleave(2, -1)));
        // The reordering is not the identity by itself: only the pairwise stacking undoes it.
        if (h > 1) Assert.False(inv3d.Same(inv));
    }

    /// <summary>
    /// LoRA on attention and on every fused expert: the text experts' adapters get gradient, the vision experts'
    /// (PEFT wraps them too, by the same suffix) none, as in transformers where vision_moe never runs on text.
    /// </summary>
    [Fact]
    public void LoraGradientsReachTheTextExpertsOnly()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 4));
        var (_, grads) = RuntimeChecks.LoraStep(h.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "o_proj"],
             "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]}
            """);
        Assert.Equal(2 * 2 * 2 * 2, grads.Keys.Count(n => n.Contains("_moe.experts.", StringComparison.Ordinal))); // 2 layers × text/vision × 2 tensors × A/B
        Assert.Contains(grads.Keys, n => n.Contains("layers.2.mlp.text_moe.experts.", StringComparison.Ordinal) && n.Contains("lora_B", StringComparison.Ordinal));
        RuntimeChecks.AssertGradients(grads, unused: n => n.Contains(".vision_moe.", StringComparison.Ordinal));
    }

    /// <summary>
    /// A checkpoint written as transformers 5.17 saves this model (conversion reversed: text_moe.gate.weight and
    /// vision_moe.gate.weight transposed into mlp.gate.weight / gate.weight_1 [H, E], both statics rows in one
    /// mlp.moe_statics.e_score_correction_bias [2, E], text experts 0..E-1 then vision experts E..2E-1 as per-expert
    /// gate/up/down Linears, model.language_model.* as model.*), built here from the runtime state by hand, loads back
    /// equal; merging LoRA on the text experts writes the same keys and shapes, changes the text experts only and keeps the
    /// routers and statics bitwise.
    /// </summary>
    [Fact]
    public void SavedLayoutLoadsBackAndMergesBack()
    {
        using var original = new DisposableModel(TorchModelFactory.Random(Config, 7));
        var spec = original.Model.Spec;
        using (no_grad())
            foreach (var (name, p) in original.Model.NamedParameters())
                if (name.EndsWith("moe_statics.e_score_correction_bias", StringComparison.Ordinal)) p.normal_(0, 0.1); // zeros would hide the row order
        var layout = CheckpointLayout.For(spec)!;
        var disk = Core.Architectures.ArchitectureRegistry.Build(spec.Config, Layout.V4).Tree.Modules
            .SelectMany(m => m.Parameters).ToDictionary(p => p.Name, p => p.Shape);

        var stored = new Dictionary<string, Tensor>();
        var rows = new Dictionary<string, SortedDictionary<long, Tensor>>();
        foreach (var (name, t) in original.Model.StateDict())
        {
            var alt = layout.For(name);
            if (alt is null) { stored[name] = t; continue; }
            if (alt.IsStack)
            {
                // gate_up_proj[e] = cat(gate_e, up_e) (rows), down_proj[e] = down_e; parts are expert by expert, gate first.
                bool gateUp = name.EndsWith("gate_up_proj", StringComparison.Ordinal);
                for (int e = 0; e < alt.NumExperts; e++)
                {
                    if (!gateUp) { stored[alt.Parts[e].Name] = t[e]; continue; }
                    var halves = t[e].chunk(2, 0);
                    stored[alt.Parts[2 * e].Name] = halves[0];
                    stored[alt.Parts[2 * e + 1].Name] = halves[1];
                }
            }
            else if (alt.Chunk is { } chunk)
            {
                if (!rows.TryGetValue(alt.Parts[0].Name, out var byOffset)) rows[alt.Parts[0].Name] = byOffset = [];
                byOffset[chunk.Offset] = t;
            }
            else stored[alt.Parts[0].Name] = alt.Transposed ? t.t() : t;
        }
        foreach (var (name, byOffset) in rows) stored[name] = cat(byOffset.Values.ToList(), 0);
        Assert.Equal(disk.Keys.Order(), stored.Keys.Order());
        Assert.All(stored, kv => Assert.Equal(disk[kv.Key], kv.Value.shape));
        const string D = "model.layers.2.mlp.";
        var state = original.Model.StateDict().ToDictionary(x => x.Name, x => x.Value);
        Assert.True(stored[D + "gate.weight_1"].Same(state[L + "2.mlp.vision_moe.gate.weight"].t()));
        Assert.True(stored[D + "moe_statics.e_score_correction_bias"][1].Same(state[L + "2.mlp.vision_moe.gate.moe_statics.e_score_correction_bias"][0]));
        Assert.True(stored[D + "experts.5.down_proj.weight"].Same(state[L + "2.mlp.vision_moe.experts.down_proj"][1]));

        using var dir = new TempDir();
        var modelDir = Path.Combine(dir.Path, "model");
        Directory.CreateDirectory(modelDir);
        File.WriteAllText(Path.Combine(modelDir, "config.json"), Config);
        IO.Safetensors.Save(Path.Combine(modelDir, "model.safetensors"), stored.Select(kv => new KeyValuePair<string, Tensor>(kv.Key, kv.Value.contiguous())));
        CheckpointLoader.Precheck(modelDir, spec);
        using var loaded = new DisposableModel(TorchModelFactory.Load(modelDir));
        var loadedState = loaded.Model.StateDict().ToDictionary(x => x.Name, x => x.Value);
        Assert.All(original.Model.StateDict(), x => Assert.True(x.Value.Same(loadedState[x.Name].to(x.Value.dtype)), $"{x.Name} differs"));

        RuntimeChecks.InjectWithNonZeroB(loaded.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
             "target_parameters": ["text_moe.experts.gate_up_proj", "text_moe.experts.down_proj"]}
            """);
        var outDir = Path.Combine(dir.Path, "merged");
        RuntimeChecks.MergesBackIntoTheSavedLayout(loaded.Model, modelDir, outDir);
        var written = IO.Safetensors.Load(Path.Combine(outDir, "model.safetensors"));
        var input = IO.Safetensors.Load(Path.Combine(modelDir, "model.safetensors"));
        try
        {
            foreach (var name in new[] { "gate.weight", "gate.weight_1", "moe_statics.e_score_correction_bias", "experts.4.gate_proj.weight", "experts.7.down_proj.weight" })
                Assert.True(input[D + name].Same(written[D + name]), name);
            Assert.False(input[D + "experts.0.up_proj.weight"].Same(written[D + "experts.0.up_proj.weight"]));
            Assert.False(input[D + "experts.3.down_proj.weight"].Same(written[D + "experts.3.down_proj.weight"]));
        }
        finally
        {
            foreach (var t in input.Values.Concat(written.Values)) t.Dispose();
        }
    }
}
