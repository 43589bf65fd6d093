using MoeLora.Core.Architectures.Runtime;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// DeepSeek-V4's pieces beyond its transformers fixture (MoeTypesParityTests), each against a per-element loop written
/// from transformers 5.17's DeepseekV4 classes: the HCA and CSA compressors on inputs long enough to compress several
/// windows, the lightning indexer's picks, the Sinkhorn-mixed hyper-connection, the hash and top-k routers with the
/// clamped experts; then LoRA gradients through a model whose windows, compression and indexer all act on 9 tokens.
/// </summary>
public class DeepseekV4Tests
{
    public DeepseekV4Tests() => TorchRuntime.EnsureInitialized();

    const int Hidden = 6, Seq = 9, QRank = 5, HeadDim = 8, RopeDim = 4;
    const double Eps = 1e-6, Theta = 50.0;

    static double[] D(Tensor t) => t.detach().to(ScalarType.Float64).contiguous().data<double>().ToArray();

    static Dictionary<string, double[]> Randomize(HfModule m, int seed)
    {
        var p = m.NamedParameters().ToDictionary(x => x.Name, x => x.Param);
        using (no_grad())
            foreach (var (_, t) in p) t.normal_(0, 0.6, generator: new Generator((ulong)seed++));
        return p.ToDictionary(kv => kv.Key, kv => D(kv.Value));
    }

    static DeepseekV4AttentionSettings Attention(KvCompressorSettings? c) =>
        new(Heads: 2, HeadDim, QRank, OGroups: 2, OLoraRank: 3, RopeDim, new RopeSettings("default", Theta, RopeDim), SlidingWindow: 3, Eps, c);

    static ForwardContext Context(int seq) => new()
    {
        Positions = arange(seq, ScalarType.Int64).unsqueeze(0), AttentionMask = ones(1, seq, ScalarType.Int64), DType = ScalarType.Float32,
    };

    // y[j][c] = Σ_i x[j][i]·w[c][i] (nn.Linear without bias), w flattened [rows, cols].
    static double[][] Linear(double[] x, int tokens, double[] w, int rows)
    {
        int cols = w.Length / rows;
        return Enumerable.Range(0, tokens).Select(j => Enumerable.Range(0, rows).Select(c => Enumerable.Range(0, cols).Sum(i => x[j * cols + i] * w[c * cols + i])).ToArray()).ToArray();
    }

    // DeepseekV4RMSNorm then the interleaved rope on the last RopeDim dims at position pos (pair i by angle pos·θ^(−2i/RopeDim)).
    static double[] NormRope(double[] e, double[] weight, int pos)
    {
        double inv = 1 / Math.Sqrt(e.Select(v => v * v).Average() + Eps);
        var o = e.Select((v, c) => v * inv * weight[c]).ToArray();
        return Rope(o, pos);
    }

    static double[] Rope(double[] v, int pos)
    {
        var o = (double[])v.Clone();
        int start = v.Length - RopeDim;
        for (int i = 0; i < RopeDim / 2; i++)
        {
            double angle = pos * Math.Pow(Theta, -2.0 * i / RopeDim), c = Math.Cos(angle), s = Math.Sin(angle);
            double a = v[start + 2 * i], b = v[start + 2 * i + 1];
            o[start + 2 * i] = a * c - b * s;
            o[start + 2 * i + 1] = b * c + a * s;
        }
        return o;
    }

    /// <summary>
    /// The compressed entries, one window at a time: each entry's slots listed as (token, channel offset, position_bias
    /// row); per channel a softmax over the slots of gate + bias weighs kv. Overlapping (CSA): window w−1's tokens give
    /// their first half (bias rows of that window), window w's tokens their second half.
    /// </summary>
    static List<double[]> Entries(double[] x, Dictionary<string, double[]> p, string prefix, int dim, int rate, bool overlap)
    {
        int width = overlap ? 2 * dim : dim;
        var kv = Linear(x, Seq, p[prefix + "kv_proj.weight"], width);
        var gate = Linear(x, Seq, p[prefix + "gate_proj.weight"], width);
        var bias = p[prefix + "position_bias"];
        var entries = new List<double[]>();
        for (int w = 0; w < Seq / rate; w++)
        {
            var slots = new List<(int Token, int Offset, int Row)>();
            if (overlap && w > 0) slots.AddRange(Enumerable.Range(0, rate).Select(j => ((w - 1) * rate + j, 0, j)));
            slots.AddRange(Enumerable.Range(0, rate).Select(j => (w * rate + j, overlap ? dim : 0, j)));
            var e = new double[dim];
            for (int c = 0; c < dim; c++)
            {
                var logits = slots.Select(s => gate[s.Token][s.Offset + c] + bias[s.Row * width + s.Offset + c]).ToArray();
                double max = logits.Max();
                var exps = logits.Select(l => Math.Exp(l - max)).ToArray();
                e[c] = slots.Select((s, k) => exps[k] / exps.Sum() * kv[s.Token][s.Offset + c]).Sum();
            }
            entries.Add(NormRope(e, p[prefix + "kv_norm.weight"], w * rate));
        }
        return entries;
    }

    static void Near(double[] want, double[] got, double tol, string what)
    {
        Assert.Equal(want.Length, got.Length);
        for (int i = 0; i < want.Length; i++) Assert.True(Math.Abs(want[i] - got[i]) <= tol, $"{what}[{i}]: {got[i]} vs {want[i]}");
    }

    // DeepseekV4HCACompressor: 9 tokens at rate 3 make 3 entries; query t reads entry w only when w < (t + 1) // 3.
    [Fact]
    public void HeavilyCompressedEntriesPoolEachWindowAndAreReadCausally()
    {
        const int rate = 3;
        var compressor = new DeepseekV4Compressor(Hidden, Attention(new KvCompressorSettings(rate, null)), new KvCompressorSettings(rate, null),
            new Init(ScalarType.Float32, CPU, 0.5, new Generator(1)));
        var p = Randomize(compressor, 10);
        Assert.Equal(["position_bias", "kv_proj.weight", "gate_proj.weight", "kv_norm.weight"], p.Keys);
        var x = randn(new long[] { 1, Seq, Hidden }, generator: new Generator(2));
        var (entries, bias) = compressor.Forward(x, randn(new long[] { 1, Seq, QRank }, generator: new Generator(3)), Context(Seq));
        Assert.Equal(new long[] { 1, 1, Seq / rate, HeadDim }, entries.shape);
        Near(Entries(D(x), p, "", HeadDim, rate, overlap: false).SelectMany(e => e).ToArray(), D(entries), 1e-5, "entries");
        var b = D(bias!);
        for (int t = 0; t < Seq; t++)
            for (int w = 0; w < Seq / rate; w++)
                Assert.Equal(w < (t + 1) / rate ? 0.0 : double.NegativeInfinity, b[t * (Seq / rate) + w]);
    }

    // DeepseekV4CSACompressor and DeepseekV4Indexer: rate 2 gives 4 overlapping entries; each query keeps the indexer's
    // best 2 of the entries it may read (fewer while it may read fewer) and reads exactly those.
    [Fact]
    public void SparseEntriesOverlapWindowsAndQueriesReadTheIndexersBestEntries()
    {
        const int rate = 2, topK = 2, ixHeads = 3, ixDim = 6;
        var c = new KvCompressorSettings(rate, new LightningIndexerSettings(ixHeads, ixDim, topK));
        var compressor = new DeepseekV4Compressor(Hidden, Attention(c), c, new Init(ScalarType.Float32, CPU, 0.5, new Generator(1)));
        var p = Randomize(compressor, 20);
        Assert.Equal(["position_bias", "kv_proj.weight", "gate_proj.weight", "kv_norm.weight", "indexer.position_bias", "indexer.kv_proj.weight",
            "indexer.gate_proj.weight", "indexer.kv_norm.weight", "indexer.q_b_proj.weight", "indexer.scorer.weights_proj.weight"], p.Keys);
        var x = randn(new long[] { 1, Seq, Hidden }, generator: new Generator(3));
        var q = randn(new long[] { 1, Seq, QRank }, generator: new Generator(4));
        var (entries, bias) = compressor.Forward(x, q, Context(Seq));
        int t = Seq / rate;
        Near(Entries(D(x), p, "", HeadDim, rate, overlap: true).SelectMany(e => e).ToArray(), D(entries), 1e-5, "entries");

        // score(s, e) = Σ_h weights_proj(x_s)_h·h^-0.5 · relu(rope(q_h(s))·k_e)·d^-0.5, k the indexer's own entries.
        var keys = Entries(D(x), p, "indexer.", ixDim, rate, overlap: true);
        var queries = Linear(D(q), Seq, p["indexer.q_b_proj.weight"], ixHeads * ixDim);
        var weights = Linear(D(x), Seq, p["indexer.scorer.weights_proj.weight"], ixHeads);
        var b = D(bias!);
        int picked = 0;
        for (int s = 0; s < Seq; s++)
        {
            int readable = (s + 1) / rate;
            var scores = Enumerable.Range(0, readable).Select(e => Enumerable.Range(0, ixHeads).Sum(h =>
            {
                var qh = Rope(queries[s].Skip(h * ixDim).Take(ixDim).ToArray(), s);
                double dot = qh.Select((v, i) => v * keys[e][i]).Sum();
                return weights[s][h] / Math.Sqrt(ixHeads) * Math.Max(dot, 0) / Math.Sqrt(ixDim);
            })).ToArray();
            var best = Enumerable.Range(0, readable).OrderByDescending(e => scores[e]).Take(topK).ToHashSet();
            picked += best.Count;
            for (int e = 0; e < t; e++)
                Assert.True(best.Contains(e) ? b[s * t + e] == 0 : double.IsNegativeInfinity(b[s * t + e]), $"query {s}, entry {e}");
        }
        Assert.True(picked < Seq * t && picked > Seq, "the indexer should leave out some readable entries");
    }

    static readonly HyperConnectionSettings Hc = new(3, Eps: 1e-3, NormEps: 1e-5, PostMagnitude: 2.0, SinkhornIterations: 6);

    // DeepseekV4HyperConnection: pre / post as HY-V4's (post without eps), plus comb: softmax rows + eps, a column
    // normalisation, then 5 rounds of row and column normalisation (each sum + eps).
    [Fact]
    public void HyperConnectionProjectsTheStreamMixWithSinkhorn()
    {
        const int n = 3, h = 4, tokens = 4;
        var hc = new HyperConnection(h, Hc, new Init(ScalarType.Float32, CPU, 0.5, new Generator(1)));
        var init = hc.NamedParameters().ToDictionary(x => x.Name, x => D(x.Param));
        Assert.Equal(new long[] { (2 + n) * n, n * h }, hc.NamedParameters().First().Param.shape);
        Assert.All(init["base"], v => Assert.Equal(0.0, v));
        Assert.All(init["scale"], v => Assert.Equal(1.0, v));
        var p = Randomize(hc, 5);
        var x = randn(new long[] { 1, tokens, n, h }, generator: new Generator(6));
        var (post, input, comb) = hc.Forward(x);
        double[] xs = D(x), fn = p["fn"], bs = p["base"], sc = p["scale"];
        for (int tok = 0; tok < tokens; tok++)
        {
            var flat = xs.Skip(tok * n * h).Take(n * h).ToArray();
            double inv = 1 / Math.Sqrt(flat.Select(v => v * v).Average() + Hc.NormEps);
            var m = Enumerable.Range(0, (2 + n) * n).Select(k => flat.Select((v, j) => v * inv * fn[k * n * h + j]).Sum()).ToArray();
            static double Sigmoid(double v) => 1 / (1 + Math.Exp(-v));
            var pre = Enumerable.Range(0, n).Select(i => Sigmoid(m[i] * sc[0] + bs[i]) + Hc.Eps).ToArray();
            Near(Enumerable.Range(0, n).Select(i => 2 * Sigmoid(m[n + i] * sc[1] + bs[n + i])).ToArray(), D(post).Skip(tok * n).Take(n).ToArray(), 1e-5, "post");
            Near(Enumerable.Range(0, h).Select(d => Enumerable.Range(0, n).Sum(i => pre[i] * flat[i * h + d])).ToArray(), D(input).Skip(tok * h).Take(h).ToArray(), 1e-5, "input");
            var c = new double[n, n];
            for (int r = 0; r < n; r++)
            {
                var logits = Enumerable.Range(0, n).Select(k => m[2 * n + r * n + k] * sc[2] + bs[2 * n + r * n + k]).ToArray();
                var exps = logits.Select(l => Math.Exp(l - logits.Max())).ToArray();
                for (int k = 0; k < n; k++) c[r, k] = exps[k] / exps.Sum() + Hc.Eps;
            }
            void Columns() { for (int k = 0; k < n; k++) { double s = Enumerable.Range(0, n).Sum(r => c[r, k]) + Hc.Eps; for (int r = 0; r < n; r++) c[r, k] /= s; } }
            void Rows() { for (int r = 0; r < n; r++) { double s = Enumerable.Range(0, n).Sum(k => c[r, k]) + Hc.Eps; for (int k = 0; k < n; k++) c[r, k] /= s; } }
            Columns();
            for (int it = 0; it < Hc.SinkhornIterations - 1; it++) { Rows(); Columns(); }
            Near(c.Cast<double>().ToArray(), D(comb!).Skip(tok * n * n).Take(n * n).ToArray(), 1e-5, "comb");
        }
    }

    // DeepseekV4HashRouter picks tid2eid[token]; DeepseekV4TopKRouter the top-k of scores + e_score_correction_bias. Both
    // weigh with sqrt(softplus(logits)) renormalised and scaled; experts and the shared expert clamp at swiglu_limit.
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public void RoutersPickByTokenIdOrBiasedScoreAndExpertsClamp(bool hash)
    {
        const int experts = 4, topK = 2, inter = 3, vocab = 16;
        const double limit = 0.4, scale = 1.5;
        var settings = new MoeSettings(new ScoreFunctionRouterSettings("gate", experts, topK, RouterScoreFunction.SqrtSoftplus, scale, hash ? vocab : null),
            new ExpertsSettings(ExpertsLayout.GateUpOutInClamped, experts, inter, "silu", SwigluLimit: limit, SwigluAlpha: 1.0, SwigluUpShift: 0.0),
            new SharedExpertSettings("shared_experts", inter, "silu", null, ClampLimit: limit), MoeOrder.RouterFirst);
        var moe = new RoutedMoe(Hidden, settings, new Init(ScalarType.Float32, CPU, 0.5, new Generator(1)));
        var p = Randomize(moe, 30);
        Assert.Equal(["gate.weight", "experts.gate_up_proj", "experts.down_proj", "shared_experts.gate_proj.weight",
            "shared_experts.up_proj.weight", "shared_experts.down_proj.weight"], p.Keys);
        var router = (ScoredRouter)moe.NamedModules().Single(m => m.Name == "gate").Module;
        var table = new long[vocab, topK];
        for (int v = 0; v < vocab; v++) { table[v, 0] = v % experts; table[v, 1] = (v * 3 + 1) % experts == v % experts ? (v + 1) % experts : (v * 3 + 1) % experts; }
        using (no_grad())
        {
            if (hash) router.HashTable!.copy_(tensor(table));
            else router.SelectionBias!.copy_(tensor(new float[] { 0, 5, 0, 5 }));   // experts 1 and 3 always win
        }
        var ids = tensor(new long[] { 3, 7, 0, 12, 5 }).unsqueeze(0);
        var x = randn(new long[] { 1, 5, Hidden }, generator: new Generator(7));
        var ctx = new ForwardContext { Positions = arange(5, ScalarType.Int64).unsqueeze(0), AttentionMask = ones(1, 5, ScalarType.Int64), DType = ScalarType.Float32, InputIds = ids };
        var y = D(moe.Forward(x, ctx));
        Assert.Equal(hash ? 0 : 1, ctx.RouterLogits.Count);

        static double Silu(double v) => v / (1 + Math.Exp(-v));
        double[] Mlp(double[] xt, double[] gateUp, double[] down)
        {
            var gu = Linear(xt, 1, gateUp, 2 * inter)[0];
            var a = Enumerable.Range(0, inter).Select(i => Silu(Math.Min(gu[i], limit)) * Math.Clamp(gu[inter + i], -limit, limit)).ToArray();
            return Linear(a, 1, down, Hidden)[0];
        }
        var xs = D(x);
        var idv = D(ids).Select(v => (int)v).ToArray();
        int gu = 2 * inter * Hidden, dn = Hidden * inter;
        var sharedGateUp = p["shared_experts.gate_proj.weight"].Concat(p["shared_experts.up_proj.weight"]).ToArray();
        for (int t = 0; t < 5; t++)
        {
            var xt = xs.Skip(t * Hidden).Take(Hidden).ToArray();
            var scores = Linear(xt, 1, p["gate.weight"], experts)[0].Select(l => Math.Sqrt(Math.Log(1 + Math.Exp(l)))).ToArray();
            int[] chosen = hash ? [(int)table[idv[t], 0], (int)table[idv[t], 1]] : [1, 3];
            double sum = chosen.Sum(e => scores[e]);
            var want = Mlp(xt, sharedGateUp, p["shared_experts.down_proj.weight"]);
            foreach (var e in chosen)
            {
                var o = Mlp(xt, p["experts.gate_up_proj"].Skip(e * gu).Take(gu).ToArray(), p["experts.down_proj"].Skip(e * dn).Take(dn).ToArray());
                for (int d = 0; d < Hidden; d++) want[d] += scores[e] / sum * scale * o[d];
            }
            Near(want, y.Skip(t * Hidden).Take(Hidden).ToArray(), 1e-5, $"token {t}");
        }
    }

    // Three layers (sliding, HCA at rate 3, CSA at rate 2 keeping 1 entry), a window of 3: on 9 tokens every path acts.
    const string Tiny = """
        {"model_type": "deepseek_v4", "vocab_size": 64, "hidden_size": 16, "moe_intermediate_size": 8, "num_hidden_layers": 3,
         "num_attention_heads": 2, "head_dim": 8, "q_lora_rank": 8, "num_experts_per_tok": 2, "n_routed_experts": 4,
         "o_groups": 2, "o_lora_rank": 4, "index_n_heads": 2, "index_head_dim": 8, "index_topk": 1, "sliding_window": 3,
         "compress_rates": {"compressed_sparse_attention": 2, "heavily_compressed_attention": 3},
         "layer_types": ["sliding_attention", "heavily_compressed_attention", "compressed_sparse_attention"],
         "mlp_layer_types": ["hash_moe", "moe", "moe"], "hc_mult": 2, "hc_sinkhorn_iters": 3, "partial_rotary_factor": 0.5,
         "initializer_range": 0.1, "swiglu_limit": 0.5}
        """;

    // The indexer's projections only pick entries (integer indices): no gradient reaches their adapters, as in transformers.
    [Fact]
    public void LoraGradientsReachEveryAdapterOutsideTheIndexer()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Tiny, 3));
        var (logits, grads) = RuntimeChecks.LoraStep(h.Model, """
            {"r": 2, "lora_alpha": 4,
             "target_modules": ["q_a_proj", "q_b_proj", "kv_proj", "gate_proj", "o_b_proj", "up_proj", "down_proj", "weights_proj"],
             "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
            """);
        Assert.True(isfinite(logits).all().item<bool>());
        foreach (var name in new[] { "layers.1.self_attn.compressor.kv_proj.lora_A", "layers.2.self_attn.compressor.gate_proj.lora_B",
                     "layers.2.self_attn.compressor.indexer.q_b_proj.lora_A", "layers.0.mlp.shared_experts.up_proj.lora_A", "layers.2.mlp.experts.lora_B" })
            Assert.Contains(grads.Keys, n => n.Contains(name, StringComparison.Ordinal));
        RuntimeChecks.AssertGradients(grads, name => name.Contains(".indexer.", StringComparison.Ordinal));
    }

    [Fact]
    public void LoraOnTheGroupedOutputProjectionIsRefusedInOneLine()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Tiny, 3));
        var e = Assert.Throws<MoeLora.Core.UserInputException>(() => RuntimeChecks.LoraStep(h.Model, """{"r": 2, "target_modules": "all-linear"}"""));
        Assert.Contains("o_a_proj", e.Message, StringComparison.Ordinal);
        Assert.DoesNotContain('\n', e.Message);
    }

    // The hash layers' routers record no logits (transformers records DeepseekV4TopKRouter's only); the hash table decides.
    [Fact]
    public void HashLayersRecordNoRouterLogitsAndFollowTheirTable()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Tiny, 4));
        using var _ = no_grad();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var before = h.Model.Forward(ids, mask);
        Assert.Equal(2, before.RouterLogits.Count);
        var table = h.Model.StateDict().Single(s => s.Name == "model.layers.0.mlp.gate.tid2eid").Value;
        table.copy_(arange(64 * 2, ScalarType.Int64).remainder(4).view(64, 2));
        using var after = h.Model.Forward(ids, mask);
        Assert.True(Fixtures.MaskedRelError(after.Logits, before.Logits, mask) > 1e-3, "the hash table did not change the routing");
    }
}
