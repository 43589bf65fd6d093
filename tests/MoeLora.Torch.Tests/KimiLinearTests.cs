using MoeLora.Core.Architectures.Runtime;
using MoeLora.Core.Modules;
using MoeLora.Torch.IO;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using MoeLora.Torch.Tests.Training;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// Kimi Linear beyond its transformers fixture: the KDA block against a token-by-token reading of
/// KimiLinearDeltaAttention (per-channel decay, short convolution, gated norm), the tree against Core's, left padding,
/// LoRA gradients on every adapter, and loading the checkpoint layout transformers saves (q/k/v_conv1d concatenated
/// into conv1d, the forget gate's tensors on self_attn, block_sparse_moe, per-expert w1/w3/w2).
/// </summary>
public class KimiLinearTests
{
    public KimiLinearTests() => TorchRuntime.EnsureInitialized();

    const string Config = """
        {"model_type": "kimi_linear", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
         "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 16, "q_lora_rank": null,
         "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8, "num_experts": 8, "num_experts_per_token": 2,
         "num_shared_experts": 1, "num_expert_group": 2, "topk_group": 1, "initializer_range": 0.1,
         "linear_attn_config": {"head_dim": 8, "num_heads": 4, "short_conv_kernel_size": 4, "full_attn_layers": [2, 4], "kda_layers": [1, 3]}}
        """;

    [Fact]
    public void ParametersEqualCoresTree() => RuntimeChecks.ParametersEqualCoresTree(Config);

    // No rotary embedding anywhere (MLA "with NoPE") and zeroed padding in KDA: a left-padded row is the row alone.
    [Fact]
    public void LeftPaddedRowEqualsTheRowAlone() => RuntimeChecks.PaddedRowEqualsTheRowAlone(Config);

    // KimiLinearDeltaAttention token by token: conv over q|k|v (kernel K, causal) then silu; g = −exp(A_log)·softplus(f +
    // dt_bias) per channel; β = sigmoid(b); S ← diag(exp g)·S, S ← S + k (β (v − Sᵀk))ᵀ, o = Sᵀq with l2-normed q, k and
    // q/√d; o_norm: rms(o)·w·sigmoid(gate); o_proj.
    [Fact]
    public void DeltaAttentionFollowsTheRecurrenceTokenByToken()
    {
        const long hidden = 16, heads = 2, d = 4, kernel = 3, seq = 9, width = heads * d;
        var s = new KimiDeltaAttentionSettings(heads, d, kernel, 1e-5, "silu");
        var kda = new KimiDeltaAttention(hidden, s, new Init(ScalarType.Float64, CPU, 0.3, new Generator(5)));
        var w = kda.NamedParameters().ToDictionary(x => x.Name, x => (Tensor)x.Param);
        Assert.Equal(["q_proj.weight", "k_proj.weight", "v_proj.weight", "conv1d.weight", "forget_gate.dt_bias", "forget_gate.A_log",
            "forget_gate.f_a_proj.weight", "forget_gate.f_b_proj.weight", "b_proj.weight", "g_a_proj.weight", "g_b_proj.weight",
            "o_norm.weight", "o_proj.weight"], w.Keys);
        using var _ = no_grad();
        w["o_norm.weight"].normal_(1, 0.2, generator: new Generator(6));
        var x = randn(new long[] { 1, seq, hidden }, ScalarType.Float64, generator: new Generator(7));
        var ctx = new ForwardContext { Positions = arange(seq, ScalarType.Int64).unsqueeze(0), AttentionMask = ones(1, seq, ScalarType.Int64), DType = ScalarType.Float64 };
        var got = kda.Forward(x, ctx)[0];

        var rows = x[0];
        var mixed = cat([matmul(rows, w["q_proj.weight"].t()), matmul(rows, w["k_proj.weight"].t()), matmul(rows, w["v_proj.weight"].t())], -1);
        var conv = w["conv1d.weight"].squeeze(1);                                               // [3·width, K]
        var state = zeros(heads, d, d, ScalarType.Float64);
        for (long t = 0; t < seq; t++)
        {
            var c = zeros(3 * width, ScalarType.Float64);
            for (long j = 0; j < kernel; j++)
                if (t - j >= 0) c = c + conv[.., (int)(kernel - 1 - j)] * mixed[t - j];
            c = nn.functional.silu(c);
            var q = c[..(int)width].view(heads, d);
            var k = c[(int)width..(int)(2 * width)].view(heads, d);
            var v = c[(int)(2 * width)..].view(heads, d);
            q = q / (q * q).sum(-1, keepdim: true).add(1e-6).sqrt() / Math.Sqrt(d);
            k = k / (k * k).sum(-1, keepdim: true).add(1e-6).sqrt();
            var f = matmul(w["forget_gate.f_b_proj.weight"], matmul(w["forget_gate.f_a_proj.weight"], rows[t])) + w["forget_gate.dt_bias"];
            var g = -w["forget_gate.A_log"].view(heads, 1).exp() * nn.functional.softplus(f.view(heads, d));
            var beta = matmul(w["b_proj.weight"], rows[t]).sigmoid();
            state = state * g.exp().unsqueeze(-1);
            var memory = (state * k.unsqueeze(-1)).sum(-2);
            var delta = (v - memory) * beta.unsqueeze(-1);
            state = state + k.unsqueeze(-1) * delta.unsqueeze(-2);
            var o = (state * q.unsqueeze(-1)).sum(-2);                                          // [heads, d]
            var gate = matmul(w["g_b_proj.weight"], matmul(w["g_a_proj.weight"], rows[t])).view(heads, d);
            var normed = o / (o * o).mean([-1], keepdim: true).add(1e-5).sqrt() * w["o_norm.weight"] * gate.sigmoid();
            var want = matmul(w["o_proj.weight"], normed.flatten());
            Assert.True(Fixtures.RelError(got[t], want) < 1e-5, $"token {t}: {Fixtures.RelError(got[t], want):E2}");
        }
    }

    [Fact]
    public void LoraGradientsReachEveryAdapter()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 3));
        var lora = RuntimeChecks.InjectWithNonZeroB(h.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": "all-linear", "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
            """);
        foreach (var module in new[] { "0.self_attn.q_proj", "0.self_attn.forget_gate.f_a_proj", "0.self_attn.forget_gate.f_b_proj", "0.self_attn.b_proj",
                     "0.self_attn.g_b_proj", "0.self_attn.o_proj", "1.self_attn.kv_a_proj_with_mqa", "1.self_attn.kv_b_proj", "1.mlp.experts",
                     "1.mlp.shared_experts.down_proj", "0.mlp.gate_proj" })
            Assert.Contains(lora, p => p.Name.Contains($".layers.{module}.", StringComparison.Ordinal) && p.Name.Contains("lora_A", StringComparison.Ordinal));
        RuntimeChecks.EveryAdapterGetsGradient(h.Model, lora);
    }

    // transformers' conversion mapping for kimi_linear, written out: what save_pretrained stores for each runtime tensor.
    static IEnumerable<KeyValuePair<string, Tensor>> AsSaved(CausalLm model, long intermediate)
    {
        foreach (var (name, value) in model.StateDict())
        {
            var n = name.Replace(".self_attn.forget_gate.", ".self_attn.", StringComparison.Ordinal).Replace(".mlp.", ".block_sparse_moe.", StringComparison.Ordinal);
            if (n.EndsWith(".self_attn.conv1d.weight", StringComparison.Ordinal))
            {
                var parts = value.chunk(3, 0);
                foreach (var (part, i) in parts.Select((p, i) => (p, i)))
                    yield return new(n.Replace("conv1d", new[] { "q_conv1d", "k_conv1d", "v_conv1d" }[i], StringComparison.Ordinal), part.contiguous());
            }
            else if (n.EndsWith(".experts.gate_up_proj", StringComparison.Ordinal))
            {
                for (long e = 0; e < value.shape[0]; e++)
                {
                    yield return new(n.Replace("gate_up_proj", $"{e}.w1.weight", StringComparison.Ordinal), value[e, ..(int)intermediate].contiguous());
                    yield return new(n.Replace("gate_up_proj", $"{e}.w3.weight", StringComparison.Ordinal), value[e, (int)intermediate..].contiguous());
                }
            }
            else if (n.EndsWith(".experts.down_proj", StringComparison.Ordinal))
            {
                for (long e = 0; e < value.shape[0]; e++)
                    yield return new(n.Replace("down_proj", $"{e}.w2.weight", StringComparison.Ordinal), value[e].contiguous());
            }
            else yield return new(n, value);
        }
    }

    [Fact]
    public void LoadsTheLayoutTransformersSaves()
    {
        var spec = TorchModelFactory.Spec(Config);
        var conv = CheckpointLayout.For(spec)!.For("model.layers.0.self_attn.conv1d.weight");
        Assert.NotNull(conv);
        Assert.True(conv.Concatenated);
        Assert.Equal(["q_conv1d", "k_conv1d", "v_conv1d"], conv.Parts.Select(p => p.Name.Split('.')[^2]));

        using var dir = new TempDir();
        using var original = new DisposableModel(TorchModelFactory.Random(Config, 8));
        File.WriteAllText(Path.Combine(dir.Path, "config.json"), Config);
        var saved = AsSaved(original.Model, 16).ToList();
        Assert.Contains(saved, kv => kv.Key == "model.layers.2.self_attn.v_conv1d.weight");
        Assert.Contains(saved, kv => kv.Key == "model.layers.2.self_attn.A_log");
        Assert.Contains(saved, kv => kv.Key == "model.layers.1.block_sparse_moe.experts.7.w3.weight");
        Safetensors.Save(Path.Combine(dir.Path, "model.safetensors"), saved, new Dictionary<string, string> { ["format"] = "pt" });
        CheckpointLoader.Precheck(dir.Path, spec);
        using var loaded = new DisposableModel(TorchModelFactory.Load(dir.Path));
        using var _ = no_grad();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var a = original.Model.Forward(ids, mask);
        using var b = loaded.Model.Forward(ids, mask);
        Assert.True(a.Logits.bytes.SequenceEqual(b.Logits.bytes));
    }

    // Merging into the transformers fixture's own checkpoint writes its keys back (the convolutions split again, experts
    // per expert), and the merged checkpoint gives the adapted logits.
    [Fact]
    public void MergesBackIntoTheSavedLayout()
    {
        var modelDir = Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe", "kimi_linear", "model");
        using var dir = new TempDir();
        using var h = new DisposableModel(TorchModelFactory.Load(modelDir));
        RuntimeChecks.InjectWithNonZeroB(h.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "f_b_proj", "kv_b_proj", "down_proj"], "target_parameters": ["mlp.experts.gate_up_proj"]}
            """);
        var outDir = Path.Combine(dir.Path, "merged");
        var outKeys = RuntimeChecks.MergesBackIntoTheSavedLayout(h.Model, modelDir, outDir);
        Assert.Contains(outKeys, k => k.Name == "model.layers.0.self_attn.k_conv1d.weight");
        // The untouched convolutions come back as they were stored.
        var stored = Safetensors.Load(Path.Combine(modelDir, "model.safetensors"));
        var written = Safetensors.Load(Path.Combine(outDir, "model.safetensors"));
        foreach (var name in new[] { "q_conv1d", "k_conv1d", "v_conv1d" })
            Assert.True(stored[$"model.layers.2.self_attn.{name}.weight"].eq(written[$"model.layers.2.self_attn.{name}.weight"]).all().item<bool>(), name);
        foreach (var t in stored.Values.Concat(written.Values)) t.Dispose();
    }
}
