using MoeLora.Core.Architectures.Runtime;
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
/// DBRX beyond its transformers fixture (MoeTypesParityTests, which routes top-1): its FFN against a token-by-token
/// reading of transformers' DbrxFFN / DbrxExperts with top-2 and each p-norm, the qkv clamp, left padding, LoRA
/// gradients on every adapter (the stacked expert matrices included), the low-rank expert adapters against the same
/// adapters merged into the weights, and checkpoint / adapter / merged-state round trips.
/// </summary>
public class DbrxTests
{
    public DbrxTests() => TorchRuntime.EnsureInitialized();

    const string Config = """
        {"model_type": "dbrx", "vocab_size": 64, "d_model": 32, "n_heads": 4, "n_layers": 2, "max_seq_len": 64,
         "initializer_range": 0.1, "attn_config": {"kv_n_heads": 2, "clip_qkv": 8.0},
         "ffn_config": {"ffn_hidden_size": 24, "moe_num_experts": 4, "moe_top_k": 2}}
        """;

    // Per token: softmax over all experts, top-k, divided by the p-norm of the k; expert e uses rows [e·I, (e+1)·I)
    // of w1, v1 (as Linear weights) and w2 (as an (in, out) matrix).
    [Theory]
    [InlineData(1.0)]
    [InlineData(2.0)]
    [InlineData(null)]
    public void FfnFollowsDbrxExpertsTokenByToken(double? p)
    {
        const long hidden = 16, experts = 4, topK = 2, inter = 8, tokens = 7;
        var ffn = new StackedExpertsMoe(hidden, new StackedExpertsMoeSettings(experts, topK, inter, "silu", p),
            new Init(ScalarType.Float32, CPU, 0.5, new Generator(21)));
        var w = ffn.NamedParameters().ToDictionary(x => x.Name, x => (Tensor)x.Param);
        Assert.Equal(["router.layer.weight", "experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2"], w.Keys);
        var x = randn(new long[] { 1, tokens, hidden }, generator: new Generator(22));
        var ctx = new ForwardContext { Positions = arange(tokens, ScalarType.Int64).unsqueeze(0), AttentionMask = ones(1, tokens, ScalarType.Int64), DType = ScalarType.Float32 };
        using var _ = no_grad();
        var got = ffn.Forward(x, ctx)[0];
        for (long t = 0; t < tokens; t++)
        {
            var probs = matmul(w["router.layer.weight"], x[0, t]).softmax(0).data<float>().ToArray();
            var chosen = Enumerable.Range(0, (int)experts).OrderByDescending(e => probs[e]).Take((int)topK).ToArray();
            var norm = p is { } q ? Math.Pow(chosen.Sum(e => Math.Pow(probs[e], q)), 1 / q) : 1.0;
            var want = zeros(hidden);
            foreach (var e in chosen)
            {
                var rows = TensorIndex.Slice(e * inter, (e + 1) * inter);
                var gate = matmul(w["experts.mlp.w1"][rows], x[0, t]);
                var up = matmul(w["experts.mlp.v1"][rows], x[0, t]);
                want = want + probs[e] / norm * matmul(nn.functional.silu(gate) * up, w["experts.mlp.w2"][rows]);
            }
            Assert.True(Fixtures.RelError(got[t], want) < 1e-5, $"token {t}: {Fixtures.RelError(got[t], want):E2}");
        }
    }

    // clip_qkv clamps Wqkv's output: a bound above every value changes nothing, a tight one changes the logits.
    [Fact]
    public void ClipQkvClampsTheFusedProjection()
    {
        string With(string clip) => Config.Replace("\"clip_qkv\": 8.0", clip, StringComparison.Ordinal);
        using var none = new DisposableModel(TorchModelFactory.Random(With("\"clip_qkv\": null"), 5));
        using var loose = new DisposableModel(TorchModelFactory.Random(With("\"clip_qkv\": 1000.0"), 5));
        using var tight = new DisposableModel(TorchModelFactory.Random(With("\"clip_qkv\": 0.05"), 5));
        using var _ = no_grad();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var a = none.Model.Forward(ids, mask);
        using var b = loose.Model.Forward(ids, mask);
        using var c = tight.Model.Forward(ids, mask);
        Assert.True(Fixtures.MaskedRelError(b.Logits, a.Logits, mask) < 1e-7);
        Assert.True(Fixtures.MaskedRelError(c.Logits, a.Logits, mask) > 1e-3);
    }

    // Rope is relative and the routing per token, so a left-padded row must give what its tokens give alone.
    [Fact]
    public void LeftPaddedRowEqualsTheRowAlone()
        => RuntimeChecks.PaddedRowEqualsTheRowAlone(Config);

    static List<(string Name, TorchSharp.Modules.Parameter Param)> InjectAllLinearAndExperts(CausalLm model) => RuntimeChecks.InjectWithNonZeroB(model, """
        {"r": 2, "lora_alpha": 4, "target_modules": "all-linear", "target_parameters": ["experts.mlp.w1", "experts.mlp.v1", "experts.mlp.w2"]}
        """);

    [Fact]
    public void LoraGradientsReachEveryAdapter()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 3));
        var lora = InjectAllLinearAndExperts(h.Model);
        foreach (var module in new[] { "norm_attn_norm.attn.Wqkv", "norm_attn_norm.attn.out_proj", "ffn.router.layer", "ffn.experts.mlp" })
            Assert.Contains(lora, p => p.Name.Contains($".transformer.blocks.1.{module}.", StringComparison.Ordinal) && p.Name.Contains("lora_A", StringComparison.Ordinal));
        Assert.Equal(3, lora.Count(p => p.Name.Contains(".transformer.blocks.1.ffn.experts.mlp.", StringComparison.Ordinal) && p.Name.Contains("lora_A", StringComparison.Ordinal)));
        RuntimeChecks.EveryAdapterGetsGradient(h.Model, lora);
    }

    // The expert adapters run as low-rank products on each expert's rows; PEFT's parametrization is W + s·B·A on the
    // whole stacked matrix. Merging every adapter into its weight and turning the adapters off must give the same model.
    [Fact]
    public void LowRankExpertAdaptersEqualTheMergedWeights()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 4));
        InjectAllLinearAndExperts(h.Model);
        using var _ = no_grad();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var adapted = h.Model.Forward(ids, mask);
        var wrappers = h.Model.NamedModules().Select(m => m.Module).OfType<LoraWrapper>().ToList();
        Assert.Equal(6, wrappers.OfType<ParamLora2D>().Count(w => w.ParameterName is "w1" or "v1" or "w2"));
        foreach (var w in wrappers) w.Target.copy_(w.Merge(w.Target));
        using (LoraInjector.DisableAdapters(h.Model))
        {
            using var merged = h.Model.Forward(ids, mask);
            var err = Fixtures.MaskedRelError(adapted.Logits, merged.Logits, mask);
            Assert.True(err < 1e-5, $"low-rank vs merged: {err:E2}");
        }
        using var doubled = h.Model.Forward(ids, mask);
        Assert.True(Fixtures.MaskedRelError(doubled.Logits, adapted.Logits, mask) > 1e-4);
    }

    // DBRX checkpoints hold the runtime names (transformer.wte, transformer.blocks.{i}…, no conversion mapping): a saved
    // model loads back bit for bit; a saved adapter (stacked-matrix ParamWrappers included) loads onto it and gives
    // the adapted outputs; the merged state loads as a plain model with the same outputs.
    [Fact]
    public void CheckpointAdapterAndMergedStateRoundTrip()
    {
        using var dir = new TempDir();
        string Sub(string name) => Directory.CreateDirectory(Path.Combine(dir.Path, name)).FullName;
        void SaveModel(string at, IEnumerable<KeyValuePair<string, Tensor>> tensors)
        {
            File.WriteAllText(Path.Combine(at, "config.json"), Config);
            Safetensors.Save(Path.Combine(at, "model.safetensors"), tensors.ToList(), new Dictionary<string, string> { ["format"] = "pt" });
        }
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var original = new DisposableModel(TorchModelFactory.Random(Config, 6));
        var baseDir = Sub("base");
        SaveModel(baseDir, original.Model.StateDict().Select(t => new KeyValuePair<string, Tensor>(t.Name, t.Value)));
        Assert.Contains(original.Model.StateDict(), t => t.Name == "transformer.blocks.1.ffn.experts.mlp.w2");
        using var loaded = new DisposableModel(TorchModelFactory.Load(baseDir));
        using (var truncated = new DisposableModel(TorchModelFactory.LoadTruncated(baseDir, 1)))
            Assert.Equal(1, truncated.Model.NumLayers);
        using (no_grad())
        {
            using var a = original.Model.Forward(ids, mask);
            using var b = loaded.Model.Forward(ids, mask);
            Assert.True(a.Logits.bytes.SequenceEqual(b.Logits.bytes));
        }

        var adapter = LoraInjector.Inject(original.Model, LoraInjector.Plan(original.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": ["Wqkv"], "target_parameters": ["experts.mlp.w1", "experts.mlp.w2"]}
            """));
        using (no_grad())
            foreach (var (name, p) in LoraInjector.PeftNamedParameters(original.Model))
                if (name.Contains(".lora_B.", StringComparison.Ordinal)) p.normal_(0, 0.1, generator: new Generator(8));
        var adapterDir = Sub("adapter");
        LoraInjector.SavePeftAdapter(original.Model, adapter, adapterDir);
        LoraInjector.LoadPeftAdapter(loaded.Model, adapterDir);
        var mergedDir = Sub("merged");
        SaveModel(mergedDir, LoraMerge.MergedState(original.Model));
        using var merged = new DisposableModel(TorchModelFactory.Load(mergedDir));
        using (no_grad())
        {
            using var a = original.Model.Forward(ids, mask);
            using var b = loaded.Model.Forward(ids, mask);
            using var c = merged.Model.Forward(ids, mask);
            Assert.True(Fixtures.MaskedRelError(b.Logits, a.Logits, mask) < 1e-6);
            Assert.True(Fixtures.MaskedRelError(c.Logits, a.Logits, mask) < 1e-5);
            using (LoraInjector.DisableAdapters(loaded.Model))
            {
                using var off = loaded.Model.Forward(ids, mask);
                Assert.True(Fixtures.MaskedRelError(off.Logits, a.Logits, mask) > 1e-4);
            }
        }
    }

    [Fact]
    public void ExpertsReportTheirCountsPerBlock()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 6));
        using var _ = no_grad();
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        using var o = h.Model.Forward(ids, mask);
        var rows = h.Model.NamedModules().Where(m => m.Module is IRoutedExperts).ToList();
        Assert.Equal(["transformer.blocks.0.ffn.experts.mlp", "transformer.blocks.1.ffn.experts.mlp"], rows.Select(r => r.Name));
        Assert.All(rows, r => Assert.Equal(ids.numel() * 2, ((IRoutedExperts)r.Module).LastSelectedCounts!.Sum()));
    }
}
