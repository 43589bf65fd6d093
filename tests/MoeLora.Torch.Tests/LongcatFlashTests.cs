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
/// LongCat-Flash beyond its transformers fixture (MoeTypesParityTests, whose router bias is zero and whose kv latent
/// scale is 1): the shortcut MoE's router and identity experts against a per-token reimplementation of
/// transformers' code, MLA's latent scales, left padding, the tree, LoRA gradients under both expert dispatches, and
/// the configs transformers' forward cannot run.
/// </summary>
public class LongcatFlashTests
{
    public LongcatFlashTests() => TorchRuntime.EnsureInitialized();

    // 4 real + 2 identity experts, top-3 of 6, so both kinds are picked; q and kv latents narrower than hidden.
    const string Config = """
        {"model_type": "longcat_flash", "vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 4, "ffn_hidden_size": 48, "expert_ffn_hidden_size": 16, "n_routed_experts": 4,
         "zero_expert_num": 2, "moe_topk": 3, "q_lora_rank": 16, "kv_lora_rank": 8, "qk_nope_head_dim": 8,
         "qk_rope_head_dim": 8, "head_dim": 8, "v_head_dim": 8, "routed_scaling_factor": 2.0, "initializer_range": 0.1,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0}}
        """;

    static ForwardContext Context(long tokens) => new()
    {
        Positions = arange(tokens, ScalarType.Int64).unsqueeze(0),
        AttentionMask = ones(1, tokens, ScalarType.Int64),
        DType = ScalarType.Float32,
    };

    // LongcatFlashTopkRouter + LongcatFlashExperts, token by token: softmax of x·Wᵀ (the classifier's bias unused),
    // top-k of softmax + e_score_correction_bias, weight = softmax · routed_scaling_factor; a real expert e adds
    // down_e(silu(gate_e x) · up_e x) · w, an identity expert x · w.
    [Theory]
    [InlineData(ExpertDispatch.Grouped)]
    [InlineData(ExpertDispatch.Padded)]
    [InlineData(ExpertDispatch.Loop)]
    public void ShortcutMoeRoutesAsTransformers(ExpertDispatch dispatch)
    {
        const int hidden = 8, experts = 3, zero = 2, topK = 3, inter = 5, tokens = 24;
        const double scale = 1.7;
        var settings = new MoeSettings(new SoftmaxBiasRouterSettings("router", "classifier", experts + zero, topK, scale, LinearBias: true),
            new ExpertsSettings(ExpertsLayout.GateUpOutIn, experts, inter, "silu", ZeroExperts: zero), null, MoeOrder.ExpertsFirst);
        var moe = new RoutedMoe(hidden, settings, new Init(ScalarType.Float32, CPU, 0.5, new Generator(2)));
        foreach (var e in moe.NamedModules().Select(m => m.Module).OfType<ExpertsBase>()) e.Dispatching = dispatch;
        var state = moe.StateDict().ToDictionary(s => s.Name, s => s.Value);
        Assert.Equal(["experts.gate_up_proj", "experts.down_proj", "router.e_score_correction_bias", "router.classifier.weight", "router.classifier.bias"],
            state.Keys);
        Assert.Equal(new long[] { experts + zero, 2 * inter, hidden }, state["experts.gate_up_proj"].shape);
        Assert.Equal(new long[] { experts, hidden, inter }, state["experts.down_proj"].shape);
        var bias = new float[] { 0f, 0.25f, 0f, 0f, 0.15f };
        using (no_grad())
        {
            state["router.e_score_correction_bias"].copy_(tensor(bias));
            state["router.classifier.bias"].copy_(tensor(new float[] { 3, -3, 2, -2, 1 }));
        }
        var x = randn(new long[] { tokens, hidden }, generator: new Generator(5));
        var ctx = Context(tokens);
        Tensor got;
        using (no_grad()) got = moe.Forward(x.unsqueeze(0), ctx).squeeze(0);

        var w = state["router.classifier.weight"];
        Assert.True(Fixtures.RelError(ctx.RouterLogits.Single(), matmul(x, w.t())) < 1e-6);
        var probs = matmul(x, w.t()).softmax(-1).data<float>().ToArray();
        var gateUp = state["experts.gate_up_proj"];
        var down = state["experts.down_proj"];
        var want = zeros(tokens, hidden);
        int realPicks = 0, identityPicks = 0, biasChanged = 0;
        for (int t = 0; t < tokens; t++)
        {
            var p = probs.Skip(t * (experts + zero)).Take(experts + zero).ToArray();
            var chosen = Enumerable.Range(0, experts + zero).OrderByDescending(e => p[e] + bias[e]).Take(topK).ToArray();
            if (!chosen.Order().SequenceEqual(Enumerable.Range(0, experts + zero).OrderByDescending(e => p[e]).Take(topK).Order())) biasChanged++;
            var xt = x[t];
            var sum = zeros(hidden);
            foreach (var e in chosen)
            {
                Tensor h;
                if (e < experts)
                {
                    realPicks++;
                    var gu = matmul(gateUp[e], xt).chunk(2, 0);
                    h = matmul(down[e], nn.functional.silu(gu[0]) * gu[1]);
                }
                else
                {
                    identityPicks++;
                    h = xt;
                }
                sum = sum + h * (p[e] * scale);
            }
            want[t] = sum;
        }
        Assert.True(realPicks > 0 && identityPicks > 0 && biasChanged > 0, $"real {realPicks}, identity {identityPicks}, bias-changed {biasChanged}");
        var err = Fixtures.RelError(got, want);
        Assert.True(err < 1e-5, $"MoE output vs per-token reference: {err:E2}");
    }

    // LongcatFlashMLA scales the query by √(hidden/q_lora_rank) and the normed kv latent by √(hidden/kv_lora_rank):
    // the same as an unscaled MLA whose q_b_proj and kv_a_layernorm weights carry those factors.
    [Fact]
    public void MlaLatentScalesActLikeScaledWeights()
    {
        const int hidden = 32;
        var plain = new MlaAttentionSettings(4, 16, 8, 8, 8, 8, false, RopeInterleave: true, Scaling: Math.Pow(16, -0.5), LowRankNormEps: 1e-6);
        var scaled = plain with { LatentScale = new MlaLatentScale(Math.Sqrt(2), 2) };
        var rope = Rotary.FromSettings(new RopeSettings("default", 1e7, 8));
        var a = new MlaAttention(hidden, scaled, rope, new Init(ScalarType.Float32, CPU, 0.2, new Generator(3)));
        MlaAttention B(double q, double kv)
        {
            var b = new MlaAttention(hidden, plain, rope, new Init(ScalarType.Float32, CPU, 0.2, new Generator(3)));
            var p = b.NamedParameters().ToDictionary(n => n.Name, n => n.Param);
            using (no_grad())
            {
                p["q_b_proj.weight"].mul_(q);
                p["kv_a_layernorm.weight"].mul_(kv);
            }
            return b;
        }
        var x = randn(new long[] { 1, 7, hidden }, generator: new Generator(4));
        using var _ = no_grad();
        var want = a.Forward(x, Context(7));
        Assert.True(Fixtures.RelError(B(Math.Sqrt(2), 2).Forward(x, Context(7)), want) < 1e-5);
        // Each factor matters: leaving out the kv one (keys and values) or the query one changes the output.
        Assert.True(Fixtures.RelError(B(Math.Sqrt(2), 1).Forward(x, Context(7)), want) > 1e-3);
        Assert.True(Fixtures.RelError(B(1, 2).Forward(x, Context(7)), want) > 1e-3);
    }

    [Fact]
    public void ParametersEqualCoresTree()
    {
        RuntimeChecks.ParametersEqualCoresTree(Config);
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 0));
        Assert.Contains(h.Model.NamedModules(), m => m.Name == "model.layers.1.mlp.experts.identity_expert");
        Assert.Contains(h.Model.StateDict(), s => s.Name == "model.layers.0.mlp.router.e_score_correction_bias");
    }

    // Rope is relative and nothing else depends on the absolute position, so a left-padded row gives what its tokens
    // give alone.
    [Fact]
    public void LeftPaddedRowEqualsTheRowAlone()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 5));
        RuntimeChecks.PaddedRowEqualsTheRowAlone(h.Model);
    }

    static (Tensor Logits, Dictionary<string, Tensor> Grads) TrainStep(ExpertDispatch dispatch, double? maxPaddingFactor = null)
    {
        var model = TorchModelFactory.Random(Config, 3);
        model.SetExpertDispatch(dispatch);
        foreach (var e in model.NamedModules().Select(m => m.Module).OfType<ExpertsBase>()) e.MaxPaddingFactor = maxPaddingFactor;
        return RuntimeChecks.LoraStep(model, """
            {"r": 2, "lora_alpha": 4, "target_modules": "all-linear", "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
            """);
    }

    // Every adapter gets a finite non-zero gradient except the router's classifier: LongcatFlashTopkRouter reads
    // classifier.weight directly (F.linear on the fp32 weight), so under PEFT a LoRA there never enters the forward.
    // (PEFT 0.21's transformers-5 rewrite turns all-linear's gate_proj / up_proj / down_proj into the fused experts, so
    // the dense mlps get none, as Core's plan says.)
    // The grouped dispatch (grouped_mm, padded or per-segment, gate_up_proj's identity rows left out) equals the
    // per-expert loop.
    [Fact]
    public void LoraGradientsReachEveryAdapterThatTransformersUses()
    {
        var (logits, grads) = TrainStep(ExpertDispatch.Loop);
        Assert.Contains(grads.Keys, n => n.Contains("self_attn.1.kv_b_proj.lora_A", StringComparison.Ordinal));
        Assert.Contains(grads.Keys, n => n.Contains("mlp.experts.lora_A", StringComparison.Ordinal));
        Assert.Contains(grads.Keys, n => n.Contains("router.classifier.lora_A", StringComparison.Ordinal));
        RuntimeChecks.AssertGradients(grads, unused: n => n.Contains("router.classifier.", StringComparison.Ordinal));
        foreach (var (dispatch, factor) in new[] { (ExpertDispatch.Grouped, (double?)null), (ExpertDispatch.Padded, 100.0), (ExpertDispatch.Padded, 0.0) })
        {
            var (gl, gg) = TrainStep(dispatch, factor);
            Assert.True(Fixtures.RelError(gl, logits) < 1e-5, $"logits ({dispatch}, padding factor {factor})");
            foreach (var (name, g) in grads)
                Assert.True(Fixtures.RelError(gg[name], g) < 1e-4, $"{name} ({dispatch}, padding factor {factor})");
        }
    }

    // GradientFlow on the fused-expert adapters: gate_up_proj's adapter spans all E + Z rows, but the identity experts'
    // slices never compute, so they count as not selected and get no gradient; the real ones get gradient exactly
    // where the router sent tokens.
    [Fact]
    public void IdentityExpertSlicesGetNoGradient()
    {
        using var h = new DisposableModel(TorchModelFactory.Random(Config, 3));
        LoraInjector.Inject(h.Model, LoraInjector.Plan(h.Model, """
            {"r": 2, "lora_alpha": 4, "target_modules": ["o_proj"], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
            """));
        using (no_grad())
            foreach (var (name, p) in LoraInjector.PeftNamedParameters(h.Model))
                if (name.Contains(".lora_B.", StringComparison.Ordinal)) p.normal_(0, 0.1, generator: new Generator(7));
        var (ids, mask) = RuntimeChecks.LeftPaddedBatch();
        var flows = GradientFlow.Measure(h.Model, ids, mask);
        Assert.Equal(4, flows.Count); // 2 layers × (gate_up_proj, down_proj)
        foreach (var f in flows)
        {
            Assert.Equal(f.Parameter == "gate_up_proj" ? 6 : 4, f.NumExperts);
            Assert.True(f.GradientOnlyWhereSelected, $"{f.Module}.{f.Parameter}: selected [{string.Join(",", f.Selected)}], gradient [{string.Join(",", f.WithGradient)}]");
            Assert.NotEmpty(f.WithGradient);
            Assert.All(f.WithGradient, e => Assert.True(e < 4));
        }
    }

    // merge_and_unload into the checkpoint layout: gate/up parts for all E + Z experts (the identity ones' slices merged
    // too, though never used), down parts for the E real ones; the merged checkpoint gives the adapted logits.
    [Fact]
    public void MergedCheckpointGivesTheAdaptedLogits()
    {
        var modelDir = Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe", "longcat_flash", "model");
        var reference = Safetensors.Load(Path.Combine(modelDir, "..", "reference.safetensors"));
        var (ids, mask) = (reference["input_ids"], reference["attention_mask"]);
        using var dir = new TempDir();
        using var adapted = new DisposableModel(TorchModelFactory.Load(modelDir));
        LoraInjector.Inject(adapted.Model, LoraInjector.Plan(File.ReadAllText(Path.Combine(modelDir, "config.json")), """
            {"target_modules": ["q_b_proj", "kv_b_proj"], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
             "r": 2, "lora_alpha": 4, "init_lora_weights": false}
            """), seed: 2);
        adapted.Model.Eval();
        using var _ = no_grad();
        using var want = adapted.Model.Forward(ids, mask);
        using (var plain = TorchModelFactory.Load(modelDir).Forward(ids, mask))
            Assert.True(Fixtures.MaskedRelError(plain.Logits, want.Logits, mask) > 1e-4, "the adapter changes nothing: the test would prove nothing");
        var outDir = Path.Combine(dir.Path, "merged");
        LoraMerge.SaveHubCheckpoint(adapted.Model, modelDir, outDir);
        var (before, _, _) = Safetensors.ReadHeader(Path.Combine(modelDir, "model.safetensors"));
        var (after, _, _) = Safetensors.ReadHeader(Path.Combine(outDir, "model.safetensors"));
        Assert.Equal(before.Select(e => (e.Name, string.Join(",", e.Shape))), after.Select(e => (e.Name, string.Join(",", e.Shape))));
        using var merged = new DisposableModel(TorchModelFactory.Load(outDir));
        using var got = merged.Model.Forward(ids, mask);
        var err = Fixtures.MaskedRelError(got.Logits, want.Logits, mask);
        Assert.True(err < 1e-5, $"merged vs adapted logits: {err:E2}");
    }

    // transformers' forward fails on these (apply_rotary_pos_emb_interleave cannot broadcast another rotary width,
    // repeat_kv multiplies LongcatFlashMLA's per-head keys): the runtime refuses them in one line.
    [Theory]
    [InlineData("\"head_dim\": 8", "\"head_dim\": 16", "rotary width (head_dim 16)")]
    [InlineData("\"num_key_value_heads\": 4", "\"num_key_value_heads\": 2", "num_key_value_heads 2")]
    [InlineData("\"moe_topk\": 3", "\"moe_topk\": 7", "choosing 7 of 6")]
    public void ConfigsTransformersCannotRunAreRefusedInOneLine(string from, string to, string reason)
    {
        var config = Config.Replace(from, to, StringComparison.Ordinal);
        Assert.NotEqual(Config, config);
        var e = Assert.Throws<NotSupportedException>(() => TorchModelFactory.Random(config, 0));
        Assert.Contains(reason, e.Message, StringComparison.Ordinal);
        Assert.DoesNotContain('\n', e.Message);
    }
}
