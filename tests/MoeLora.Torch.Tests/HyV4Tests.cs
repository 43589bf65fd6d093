using MoeLora.Core.Architectures.Runtime;
using MoeLora.Torch.IO;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// HY-V4's pieces beyond its transformers fixture (MoeTypesParityTests; the indexer, left padding and LoRA are in
/// DsaAttentionTests): the hyper-connection and hyper-head mixes against a per-element reimplementation of
/// transformers' HYV4HyperConnection / HYV4HyperHead, and the configs transformers cannot run, refused in one line.
/// </summary>
public class HyV4Tests
{
    public HyV4Tests() => TorchRuntime.EnsureInitialized();

    const int Batch = 2, Seq = 3, Streams = 3, Hidden = 4;
    static readonly HyperConnectionSettings Hc = new(Streams, Eps: 1e-3, NormEps: 1e-5, PostMagnitude: 2.5);

    static double[] Doubles(Tensor t) => t.detach().to(ScalarType.Float64).contiguous().data<double>().ToArray();

    static double Sigmoid(double v) => 1 / (1 + Math.Exp(-v));

    // Random parameters (transformers' init gives structured base / scale values that would hide a swapped index).
    static Dictionary<string, TorchSharp.Modules.Parameter> Randomized(HfModule m, int seed)
    {
        var p = m.NamedParameters().ToDictionary(x => x.Name, x => x.Param);
        using (no_grad())
            foreach (var (_, t) in p) t.normal_(0, 0.7, generator: new Generator((ulong)seed++));
        return p;
    }

    // mixes[k] = Σ_j fn[k, j]·flat[j] / √(mean(flat²) + eps), flat = the streams of one token laid out stream by stream.
    static double[] Mixes(double[] x, int token, double[] fn, int rows)
    {
        int width = Streams * Hidden;
        var flat = x.Skip(token * width).Take(width).ToArray();
        double inv = 1 / Math.Sqrt(flat.Select(v => v * v).Average() + Hc.NormEps);
        return Enumerable.Range(0, rows).Select(k => Enumerable.Range(0, width).Sum(j => fn[k * width + j] * flat[j]) * inv).ToArray();
    }

    [Fact]
    public void HyperConnectionWeighsTheStreamsAsTransformers()
    {
        var hc = new HyperConnection(Hidden, Hc, new Init(ScalarType.Float32, CPU, 0.5, new Generator(1)));
        var p = Randomized(hc, 2);
        Assert.Equal(["fn", "base", "scale"], p.Keys);
        var x = randn(new long[] { Batch, Seq, Streams, Hidden }, generator: new Generator(9));
        var (post, input, _) = hc.Forward(x);
        Assert.Equal(new long[] { Batch, Seq, Streams }, post.shape);
        Assert.Equal(new long[] { Batch, Seq, Hidden }, input.shape);

        double[] xs = Doubles(x), fn = Doubles(p["fn"]), bs = Doubles(p["base"]), sc = Doubles(p["scale"]);
        double[] posts = Doubles(post), inputs = Doubles(input);
        for (int token = 0; token < Batch * Seq; token++)
        {
            var m = Mixes(xs, token, fn, 2 * Streams);
            for (int i = 0; i < Streams; i++)
            {
                double wantPost = Hc.PostMagnitude * Sigmoid(m[Streams + i] * sc[1] + bs[Streams + i]) + Hc.Eps;
                Assert.Equal(wantPost, posts[token * Streams + i], 5);
            }
            for (int h = 0; h < Hidden; h++)
            {
                double want = Enumerable.Range(0, Streams)
                    .Sum(i => (Sigmoid(m[i] * sc[0] + bs[i]) + Hc.Eps) * xs[(token * Streams + i) * Hidden + h]);
                Assert.Equal(want, inputs[token * Hidden + h], 5);
            }
        }
    }

    [Fact]
    public void HyperHeadCollapsesTheStreamsWithItsOwnWeights()
    {
        var head = new HyperHead(Hidden, Hc, new Init(ScalarType.Float32, CPU, 0.5, new Generator(1)));
        var p = Randomized(head, 4);
        Assert.Equal(["hc_fn", "hc_base", "hc_scale"], p.Keys);
        var x = randn(new long[] { Batch, Seq, Streams, Hidden }, generator: new Generator(10));
        var got = Doubles(head.Forward(x));
        double[] xs = Doubles(x), fn = Doubles(p["hc_fn"]), bs = Doubles(p["hc_base"]), sc = Doubles(p["hc_scale"]);
        for (int token = 0; token < Batch * Seq; token++)
        {
            var m = Mixes(xs, token, fn, Streams);
            for (int h = 0; h < Hidden; h++)
            {
                double want = Enumerable.Range(0, Streams)
                    .Sum(i => (Sigmoid(m[i] * sc[0] + bs[i]) + Hc.Eps) * xs[(token * Streams + i) * Hidden + h]);
                Assert.Equal(want, got[token * Hidden + h], 5);
            }
        }
    }

    // transformers' init: the pre half of base is −log(n − 1) (so the streams start as an average), the rest 0, scales 0.01.
    [Fact]
    public void HyperConnectionStartsFromTransformersInit()
    {
        var hc = new HyperConnection(Hidden, Hc, new Init(ScalarType.Float32, CPU, 0.5, new Generator(1)));
        var p = hc.NamedParameters().ToDictionary(x => x.Name, x => x.Param);
        var pre = Math.Round(-Math.Log(Streams - 1), 6);
        Assert.Equal(new[] { pre, pre, pre, 0, 0, 0 }, Doubles(p["base"]).Select(v => Math.Round(v, 6)));
        Assert.Equal(new[] { 0.01, 0.01 }, Doubles(p["scale"]).Select(v => Math.Round(v, 6)));
    }

    // transformers keeps the hyper-connections, sinks and the indexer's weights_proj / k_norm in fp32 in a bf16 model
    // (_keep_in_fp32_modules_strict); the runtime too. Up to the first MoE layer a bf16 forward of the fixture stays near
    // its fp32 reference (after it, bf16 flips near-tied expert choices of this random router, as transformers' would).
    [Fact]
    public void Bf16KeepsTransformersFp32ParametersAndStaysNearTheReference()
    {
        var dir = Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe", "hy_v4");
        var reference = Safetensors.Load(Path.Combine(dir, "reference.safetensors"));
        using var h = new DisposableModel(TorchModelFactory.Load(Path.Combine(dir, "model"), ScalarType.BFloat16));
        var dtypes = h.Model.NamedParameters().ToDictionary(p => p.Name, p => p.Param.dtype);
        foreach (var name in new[] { "model.layers.0.attn_hc.fn", "model.layers.0.ffn_hc.scale", "model.hc_head.hc_base", "model.layers.0.self_attn.sinks",
            "model.layers.0.self_attn.indexer.weights_proj.weight", "model.layers.0.self_attn.indexer.k_norm.weight" })
            Assert.Equal(ScalarType.Float32, dtypes[name]);
        Assert.Equal(ScalarType.BFloat16, dtypes["model.layers.0.self_attn.q_a_proj.weight"]);
        using var _ = no_grad();
        var mask = reference["attention_mask"];
        using var o = h.Model.Forward(reference["input_ids"], mask, outputHiddenStates: true);
        var hs = Fixtures.HiddenStates(reference);
        for (int i = 0; i < 2; i++)
        {
            var err = Fixtures.MaskedRelErrorPerToken(o.HiddenStates[i].to(ScalarType.Float32), hs[i], mask);
            Assert.True(err < 2e-2, $"bf16 hidden_states[{i}] vs fp32 reference: {err:E2}");
        }
        Assert.False(o.Logits.isnan().any().item<bool>());

        // The indexer's selection (the fixture keeps every key) also runs on mixed dtypes, and gives finite logits.
        using var sparse = new DisposableModel(TorchModelFactory.Random(Tiny.Replace("\"hc_mult\": 2", "\"hc_mult\": 2, \"index_topk\": 3", StringComparison.Ordinal), 1, ScalarType.BFloat16));
        var (ids, padMask) = RuntimeChecks.LeftPaddedBatch();
        using var so = sparse.Model.Forward(ids, padMask);
        Assert.Equal(ScalarType.BFloat16, so.Logits.dtype);
        Assert.False(so.Logits.isnan().any().item<bool>() || so.Logits.isinf().any().item<bool>());
    }

    const string Tiny = """
        {"model_type": "hy_v4", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
         "num_hidden_layers": 2, "num_attention_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
         "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
         "index_n_heads": 4, "index_head_dim": 16, "hc_mult": 2, "indexer_types": ["full", "shared"]}
        """;

    [Theory]
    [InlineData("[\"full\", \"shared\"]", "[\"shared\", \"full\"]", "no earlier indexer to reuse")]
    [InlineData("\"index_head_dim\": 16", "\"index_head_dim\": 4", "index_head_dim (4) below")]
    public void ConfigsTransformersCannotRunAreRefusedInOneLine(string from, string to, string reason)
    {
        using (var ok = new DisposableModel(TorchModelFactory.Random(Tiny, 0))) Assert.Equal(2, ok.Model.NumLayers);
        var config = Tiny.Replace(from, to, StringComparison.Ordinal);
        Assert.NotEqual(Tiny, config);
        var e = Assert.Throws<NotSupportedException>(() => TorchModelFactory.Random(config, 0));
        Assert.Contains(reason, e.Message, StringComparison.Ordinal);
        Assert.DoesNotContain('\n', e.Message);
    }
}

/// <summary>Core's hidden-state memory for a hyper-connection model equals what the runtime's states hold.</summary>
public class HyperConnectionHiddenStateMemoryTests
{
    [Fact]
    public void Core_counts_every_stream_of_every_state_but_the_last()
    {
        TorchRuntime.EnsureInitialized();
        var dir = Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe", "hy_v4", "model");
        var config = File.ReadAllText(Path.Combine(dir, "config.json"));
        var spec = TorchModelFactory.Spec(config);
        long streams = spec.Runtime!.HyperConnections!.Streams;
        Assert.True(streams > 1);
        var report = MoeLora.Core.Analysis.LoraReport.Build(spec, new MoeLora.Core.Peft.LoraConfig { R = 4, LoraAlpha = 8, TargetModules = MoeLora.Core.Peft.ModuleSelector.List(["q_a_proj"]) },
            null, new MoeLora.Core.Analysis.ReportOptions { ModelId = "hy_v4", BatchSize = 2, SeqLength = 7, DType = MoeLora.Core.Analysis.DType.Float32 });
        using var model = new DisposableModel(TorchModelFactory.Load(dir));
        using var _ = no_grad();
        var ids = randint(0, spec.VocabSize, [2, 7], generator: new Generator(5), dtype: ScalarType.Int64);
        using var output = model.Model.Forward(ids, ones_like(ids), outputHiddenStates: true);
        Assert.Equal(report.HiddenStates.NumStates, output.HiddenStates.Count);
        Assert.Equal(report.HiddenStates.AllLayersBytes, Measurements.RetainedBytes(output.HiddenStates));
        var targets = report.HiddenStates.TargetLayers.Distinct().Select(i => output.HiddenStates[i]);
        Assert.Equal(report.HiddenStates.TargetLayersBytes, Measurements.RetainedBytes(targets));
    }
}
