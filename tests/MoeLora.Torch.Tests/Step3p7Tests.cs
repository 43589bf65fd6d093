using MoeLora.Torch.IO;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Tests.Training;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// Step-3.7 beyond the parity fixture: its checkpoint layout (experts' gate and up stacked per layer and joined along
/// dimension 1; the vision tower's fused in_proj chunked into q, k, v with transformers' rope permutation of q and k)
/// loads and merges back, and its MLPs clamp the activated gate (swiglu_limits), not the gate.
/// </summary>
public class Step3p7Tests
{
    public Step3p7Tests() => TorchRuntime.EnsureInitialized();

    static string ModelDir => Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe", "step3p7", "model");

    static Tensor Param(CausalLm model, string name) => model.StateDict().Single(s => s.Name == name).Value;

    // PermuteForRope on load, written out index by index: within each head the stored row i·2 + j becomes row j·half + i.
    static Tensor Permuted(Tensor stored, long heads)
    {
        long n = stored.shape[0], half = n / heads / 2;
        var rows = new long[n];
        for (long h = 0; h < heads; h++)
            for (long i = 0; i < half; i++)
                for (long j = 0; j < 2; j++)
                    rows[h * 2 * half + j * half + i] = h * 2 * half + i * 2 + j;
        return stored.index_select(0, tensor(rows));
    }

    [Fact]
    public void LoadsStackedExpertsAndTheVisionInProjAsTransformersConvertsThem()
    {
        using var h = new DisposableModel(TorchModelFactory.Load(ModelDir));
        var stored = Safetensors.Load(Path.Combine(ModelDir, "model.safetensors"));
        try
        {
            const string layer = "model.language_model.layers.2.mlp.experts.";
            Assert.True(Param(h.Model, layer + "gate_up_proj").Same(cat([stored["model.layers.2.moe.gate_proj.weight"], stored["model.layers.2.moe.up_proj.weight"]], 1)));
            Assert.True(Param(h.Model, layer + "down_proj").Same(stored["model.layers.2.moe.down_proj.weight"]));

            long heads = h.Model.Spec.InProjRopeHeads!.Value;
            Assert.Equal(2, heads);
            var inProj = stored["vision_model.transformer.resblocks.1.attn.in_proj_weight"];
            var inBias = stored["vision_model.transformer.resblocks.1.attn.in_proj_bias"];
            long d = inProj.shape[0] / 3;
            const string attn = "model.vision_model.layers.1.self_attn.";
            Assert.True(Param(h.Model, attn + "q_proj.weight").Same(Permuted(inProj[..(int)d], heads)));
            Assert.True(Param(h.Model, attn + "k_proj.weight").Same(Permuted(inProj[(int)d..(int)(2 * d)], heads)));
            Assert.True(Param(h.Model, attn + "v_proj.weight").Same(inProj[(int)(2 * d)..]));
            Assert.True(Param(h.Model, attn + "q_proj.bias").Same(Permuted(inBias[..(int)d], heads)));
            Assert.True(Param(h.Model, attn + "v_proj.bias").Same(inBias[(int)(2 * d)..]));
            // The permutation moves rows: the plain chunk differs.
            Assert.False(Param(h.Model, attn + "q_proj.weight").Same(inProj[..(int)d]));
            Assert.True(Param(h.Model, "model.vision_model.layers.1.lambda_2").Same(stored["vision_model.transformer.resblocks.1.ls_2.gamma"]));
        }
        finally { foreach (var t in stored.Values) t.Dispose(); }
    }

    // Merging writes the checkpoint's own keys: the fused in_proj rebuilt (permutation undone) and the experts split again.
    [Fact]
    public void MergesBackIntoTheSavedLayout()
    {
        using var dir = new TempDir();
        using var h = new DisposableModel(TorchModelFactory.Load(ModelDir));
        RuntimeChecks.InjectWithNonZeroB(h.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "g_proj", "down_proj"], "target_parameters": ["mlp.experts.gate_up_proj"]}
            """);
        var outDir = Path.Combine(dir.Path, "merged");
        RuntimeChecks.MergesBackIntoTheSavedLayout(h.Model, ModelDir, outDir);
        var stored = Safetensors.Load(Path.Combine(ModelDir, "model.safetensors"));
        var written = Safetensors.Load(Path.Combine(outDir, "model.safetensors"));
        try
        {
            // q_proj of the vision tower took a (merged) adapter, k and v did not: only q's rows of in_proj change.
            var inProj = "vision_model.transformer.resblocks.0.attn.in_proj_weight";
            long d = stored[inProj].shape[0] / 3;
            Assert.True(stored[inProj][(int)d..].Same(written[inProj][(int)d..]));
            Assert.False(stored[inProj][..(int)d].Same(written[inProj][..(int)d]));
            Assert.True(stored["vision_model.transformer.resblocks.0.attn.in_proj_bias"].Same(written["vision_model.transformer.resblocks.0.attn.in_proj_bias"]));
            Assert.True(stored["model.layers.1.moe.down_proj.weight"].Same(written["model.layers.1.moe.down_proj.weight"]));
            Assert.False(stored["model.layers.1.moe.up_proj.weight"].Same(written["model.layers.1.moe.up_proj.weight"]));
        }
        finally { foreach (var t in stored.Values.Concat(written.Values)) t.Dispose(); }
    }

    [Fact]
    public void MlpsClampTheActivatedGateNotTheGate()
    {
        using var _ = no_grad();
        var init = new Init(ScalarType.Float32, CPU, 0.5, new Generator(3));
        const double limit = 0.3;
        var mlp = new GatedMlp(8, 16, "silu", init, clampLimit: limit, clampAfterActivation: true);
        var x = randn(5, 8, generator: new Generator(7)) * 3;
        var gate = mlp.gate_proj.Forward(x);
        var up = mlp.up_proj.Forward(x);
        // Step3p7MLP.forward: act_fn(gate_proj(x)).clamp(max=limit) * up_proj(x).clamp(-limit, limit).
        var want = mlp.down_proj.Forward(nn.functional.silu(gate).clamp_max(limit) * up.clamp(-limit, limit));
        Assert.True(mlp.Forward(x).allclose(want, 1e-6, 1e-7));
        var before = new GatedMlp(8, 16, "silu", init, clampLimit: limit);
        foreach (var (name, p) in before.NamedParameters()) p.copy_(mlp.NamedParameters().Single(q => q.Name == name).Param);
        Assert.False(before.Forward(x).allclose(want, 1e-6, 1e-7), "clamping before the activation gives other values here");

        // The fused experts' gate (Step3p7Experts._apply_gate) does the same on the chunked gate_up.
        var gateUp = cat([gate, up], -1);
        Assert.True(ClampedSwiglu.Apply(gateUp, limit, 1.0, 0.0, afterActivation: true).allclose(nn.functional.silu(gate).clamp_max(limit) * up.clamp(-limit, limit), 1e-6, 1e-7));
    }
}

static class Step3p7TensorChecks
{
    /// <summary>Same shape and exactly the same values.</summary>
    public static bool Same(this Tensor a, Tensor b) => a.shape.SequenceEqual(b.shape) && a.eq(b).all().item<bool>();
}
