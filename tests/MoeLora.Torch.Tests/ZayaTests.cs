using MoeLora.Core.Architectures.Runtime;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// ZAYA beyond its transformers fixture (MoeTypesParityTests). That fixture keeps transformers' init of
/// <c>qk_norm.temp</c> (zeros), so its keys are zero and the query/key path (convolutions, residual paths, L2 norm,
/// rope) does not reach its outputs: here the CCA attention is checked against a token-by-token reimplementation of
/// ZayaCCAProjection / ZayaQKNorm / ZayaAttention with every constant perturbed, plus left padding, LoRA gradients
/// and a refused config.
/// </summary>
public class ZayaTests
{
    public ZayaTests() => TorchRuntime.EnsureInitialized();

    static string ConfigWith(string ropes) => """
        {"model_type": "zaya", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 1,
         "router_hidden_size": 16, "cca_time0": 2, "cca_time1": 3, "initializer_range": 0.1, "tie_word_embeddings": true,
         "layer_types": ["hybrid", "hybrid_sliding", "hybrid"], "sliding_window": 4, "rope_parameters": {ROPES}}
        """.Replace("ROPES", ropes, StringComparison.Ordinal);

    const string HybridRope = """ "hybrid": {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5} """;
    const string SlidingRope = """ "hybrid_sliding": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5} """;
    static readonly string Config = ConfigWith(HybridRope + "," + SlidingRope);

    // Every parameter transformers initialises to a constant (temp 0, scales 1, biases 0, norm weights 1) gets noise.
    static void PerturbConstants(HfModule m, ulong seed)
    {
        var g = new Generator(seed);
        using var _ = no_grad();
        foreach (var (name, p) in m.NamedParameters())
            if (name.EndsWith("temp", StringComparison.Ordinal) || name.EndsWith("bias", StringComparison.Ordinal) || name.Contains("norm", StringComparison.Ordinal)
                || name.EndsWith("_scale", StringComparison.Ordinal))
                p.add_(randn(p.shape, generator: g) * 0.3);
    }

    // ZayaCCAProjection + ZayaQKNorm + ZayaAttention for one row, token by token: q, k, the two convolutions over the
    // zero-left-padded q|k channels, the residual paths, current and delayed values, L2 norms and temp, rotate_half
    // rope on the first dims, causal softmax attention (kv head j serves heads j·g … j·g + g − 1), o_proj.
    [Fact]
    public void CcaAttentionFollowsTransformersTokenByToken()
    {
        const int hidden = 12, heads = 4, kvHeads = 2, d = 8, k0 = 2, k1 = 3, rot = 4, s = 6, g = heads / kvHeads;
        const double theta = 10000.0;
        var settings = new CcaAttentionSettings(heads, kvHeads, d, Bias: true, k0, k1, rot, new RopeSettings("default", theta, rot), MaskSettings.Full);
        var attn = new CcaAttention(hidden, settings, Rotary.FromSettings(settings.Rope), new Init(ScalarType.Float64, CPU, 0.3, new Generator(1)));
        PerturbConstants(attn, 2);
        var p = attn.NamedParameters().ToDictionary(n => n.Name, n => n.Param.detach());
        Assert.Equal(["o_proj.weight", "o_proj.bias", "qkv_proj.q_proj.weight", "qkv_proj.q_proj.bias", "qkv_proj.k_proj.weight", "qkv_proj.k_proj.bias",
            "qkv_proj.v_proj_current.weight", "qkv_proj.v_proj_current.bias", "qkv_proj.v_proj_delayed.weight", "qkv_proj.v_proj_delayed.bias",
            "qkv_proj.conv_qk_depthwise.weight", "qkv_proj.conv_qk_depthwise.bias", "qkv_proj.conv_qk_grouped.weight", "qkv_proj.conv_qk_grouped.bias",
            "qk_norm.temp"], p.Keys);
        var x = randn(new long[] { 1, s, hidden }, ScalarType.Float64, generator: new Generator(3));
        var ctx = new ForwardContext { Positions = arange(s, ScalarType.Int64).unsqueeze(0), AttentionMask = ones(1, s, ScalarType.Int64), DType = ScalarType.Float64 };
        Tensor got;
        using (no_grad()) got = attn.Forward(x, ctx)[0];

        double[] Vec(Tensor t) => t.data<double>().ToArray();
        double[] Lin(string name, double[] v)
        {
            var w = p[name + ".weight"]; var b = Vec(p[name + ".bias"]);
            return Enumerable.Range(0, (int)w.shape[0]).Select(o => b[o] + Vec(w[o]).Zip(v, (a, c) => a * c).Sum()).ToArray();
        }
        var xs = Enumerable.Range(0, s).Select(t => Vec(x[0, t])).ToArray();
        var qs = xs.Select(v => Lin("qkv_proj.q_proj", v)).ToArray();
        var ks = xs.Select(v => Lin("qkv_proj.k_proj", v)).ToArray();
        int channels = (heads + kvHeads) * d, pad = (k0 - 1) + (k1 - 1);
        // Zero left padding, the depthwise conv (valid), then the grouped conv (valid): S outputs.
        var u = Enumerable.Range(0, s + pad).Select(j => j < pad ? new double[channels] : [.. qs[j - pad], .. ks[j - pad]]).ToArray();
        var w0 = Vec(p["qkv_proj.conv_qk_depthwise.weight"]); var b0 = Vec(p["qkv_proj.conv_qk_depthwise.bias"]);
        var dw = Enumerable.Range(0, s + pad - k0 + 1).Select(j => Enumerable.Range(0, channels)
            .Select(c => b0[c] + Enumerable.Range(0, k0).Sum(i => w0[c * k0 + i] * u[j + i][c])).ToArray()).ToArray();
        var w1 = Vec(p["qkv_proj.conv_qk_grouped.weight"]); var b1 = Vec(p["qkv_proj.conv_qk_grouped.bias"]);
        int perGroup = channels / (heads + kvHeads);
        var conv = Enumerable.Range(0, s).Select(t => Enumerable.Range(0, channels).Select(c =>
        {
            int first = c / perGroup * perGroup;
            return b1[c] + Enumerable.Range(0, perGroup).Sum(ci => Enumerable.Range(0, k1).Sum(i => w1[(c * perGroup + ci) * k1 + i] * dw[t + i][first + ci]));
        }).ToArray()).ToArray();
        var temp = Vec(p["qk_norm.temp"]);
        double[] Unit(double[] v) { var n = Math.Sqrt(v.Sum(a => a * a)); return v.Select(a => a * Math.Sqrt(d) / Math.Max(n, 2.220446049250313e-16)).ToArray(); }
        double[] Rope(double[] v, int pos)
        {
            var r = (double[])v.Clone();
            for (int i = 0; i < rot / 2; i++)
            {
                double f = pos * Math.Pow(theta, -2.0 * i / rot), a = v[i], b = v[i + rot / 2];
                r[i] = a * Math.Cos(f) - b * Math.Sin(f);
                r[i + rot / 2] = b * Math.Cos(f) + a * Math.Sin(f);
            }
            return r;
        }
        var query = new double[s][][]; var key = new double[s][][]; var value = new double[s][][];
        for (int t = 0; t < s; t++)
        {
            var qr = Enumerable.Range(0, heads).Select(h => Enumerable.Range(0, d).Select(e => (qs[t][h * d + e] + ks[t][h / g * d + e]) * 0.5).ToArray()).ToArray();
            query[t] = Enumerable.Range(0, heads).Select(h => Rope(Unit(Enumerable.Range(0, d).Select(e => conv[t][h * d + e] + qr[h][e]).ToArray()), t)).ToArray();
            key[t] = Enumerable.Range(0, kvHeads).Select(j => Rope(Unit(Enumerable.Range(0, d).Select(e =>
                conv[t][heads * d + j * d + e] + Enumerable.Range(j * g, g).Average(h => qr[h][e])).ToArray()).Select(a => a * temp[j]).ToArray(), t)).ToArray();
            double[] delayed = Lin("qkv_proj.v_proj_delayed", t == 0 ? new double[hidden] : xs[t - 1]);
            double[] v = [.. Lin("qkv_proj.v_proj_current", xs[t]), .. delayed];
            value[t] = Enumerable.Range(0, kvHeads).Select(j => v.Skip(j * d).Take(d).ToArray()).ToArray();
        }
        var want = zeros(new long[] { s, hidden }, ScalarType.Float64);
        for (int t = 0; t < s; t++)
        {
            var o = new double[heads * d];
            for (int h = 0; h < heads; h++)
            {
                var scores = Enumerable.Range(0, t + 1).Select(uu => query[t][h].Zip(key[uu][h / g], (a, b) => a * b).Sum() / Math.Sqrt(d)).ToArray();
                var mx = scores.Max();
                var e = scores.Select(sc => Math.Exp(sc - mx)).ToArray();
                for (int uu = 0; uu <= t; uu++)
                    for (int k = 0; k < d; k++) o[h * d + k] += e[uu] / e.Sum() * value[uu][h / g][k];
            }
            want[t] = tensor(Lin("o_proj", o));
        }
        var err = Fixtures.RelError(got, want);
        // fp64 throughout except the rotary tables, which are computed in fp32 as transformers does.
        Assert.True(err < 1e-6, $"CCA attention vs token-by-token reference: {err:E2}");
    }

    // The conv mask zeroes padding before the convolutions and the delayed value of the first real token is
    // v_proj_delayed(0) either way; rope is relative and the router reads only its token: a left-padded row gives
    // what its tokens give alone.
    [Fact]
    public void LeftPaddedRowEqualsTheRowAlone()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 5));
        PerturbConstants(h.Model, 6);
        RuntimeChecks.PaddedRowEqualsTheRowAlone(h.Model);
        // Not a vacuous match: the padding tokens would change the row if they leaked into it.
        using var _ = no_grad();
        var (ids, _) = RuntimeChecks.LeftPaddedBatch();
        using var alone = h.Model.Forward(ids[1, 3..].unsqueeze(0));
        using var unmasked = h.Model.Forward(ids[1].unsqueeze(0));
        Assert.True(Fixtures.RelError(unmasked.Logits[0, 3..], alone.Logits[0]) > 1e-3);
    }

    // ZayaModel keeps the residual stream in fp32 in a bf16 model: the hidden states it records are fp32 (the last,
    // after the final norm, in bf16), and the result stays close to the fp32 model's on the same weights.
    [Fact]
    public void Bf16ModelKeepsAnFp32ResidualStream()
    {
        using var full = new DisposableModel(TorchModelFactory.Random(Config, 8));
        PerturbConstants(full.Model, 9);
        using var half = new DisposableModel(TorchModelFactory.Random(Config, 8, ScalarType.BFloat16));
        var source = full.Model.StateDict().ToDictionary(s => s.Name, s => s.Value);
        using (no_grad())
            foreach (var (name, t) in half.Model.StateDict()) t.copy_(source[name]);
        using var _ = no_grad();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var a = full.Model.Forward(ids, mask, outputHiddenStates: true);
        using var b = half.Model.Forward(ids, mask, outputHiddenStates: true);
        Assert.All(b.HiddenStates.SkipLast(1), h => Assert.Equal(ScalarType.Float32, h.dtype));
        Assert.Equal(ScalarType.BFloat16, b.HiddenStates[^1].dtype);
        var err = Fixtures.MaskedRelError(b.Logits, a.Logits, mask);
        Assert.True(err < 5e-2, $"bf16 vs fp32 logits: {err:E2}");
    }

    [Fact]
    public void ParametersEqualCoresTree()
    {
        RuntimeChecks.ParametersEqualCoresTree(Config);
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 0));
        var balancing = h.Model.StateDict().Single(s => s.Name == "model.layers.2.mlp.gate.balancing_biases").Value;
        Assert.Equal(new float[] { 0, 0, 0, 0, -1 }, balancing.data<float>().ToArray());
    }

    [Fact]
    public void LoraGradientsReachEveryAdapter()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 3));
        PerturbConstants(h.Model, 4); // temp 0 would leave q/k (and their adapters) without effect
        var (_, grads) = RuntimeChecks.LoraStep(h.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": "all-linear", "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
            """);
        Assert.Contains(grads.Keys, n => n.Contains("qkv_proj.k_proj.lora_A", StringComparison.Ordinal));
        Assert.Contains(grads.Keys, n => n.Contains("qkv_proj.v_proj_delayed.lora_B", StringComparison.Ordinal));
        Assert.Contains(grads.Keys, n => n.Contains("mlp.experts.lora_A", StringComparison.Ordinal));
        Assert.Contains(grads.Keys, n => n.Contains("mlp.gate.router_mlp.fc1.lora_A", StringComparison.Ordinal));
        RuntimeChecks.AssertGradients(grads);
    }

    // A rope_parameters dict without the sliding layers' entry: transformers' rotary module cannot build that table.
    [Fact]
    public void RopeWithoutALayerTypesEntryIsRefusedInOneLine()
    {
        var config = ConfigWith(HybridRope);
        var e = Assert.Throws<NotSupportedException>(() => TorchModelFactory.Random(config, 0));
        Assert.Contains("rope_parameters without an entry for layer type 'hybrid_sliding'", e.Message, StringComparison.Ordinal);
        Assert.DoesNotContain('\n', e.Message);
    }
}
