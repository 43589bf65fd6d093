using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using MoeLora.Torch.Runtime;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// Gated DeltaNet (Qwen3-Next, Qwen3.5): the chunked delta rule against the token-by-token recurrence over several
/// chunks (the parity fixtures hold 10 tokens, one chunk), and LoRA on the linear-attention projections training on
/// the tiny checkpoints.
/// </summary>
[Collection(TorchGlobalRng.Name)]
public class GatedDeltaNetTests(ITestOutputHelper log)
{
    static string Model(string type) => Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe", type, "model");

    /// <summary>
    /// The recurrence transformers' torch_recurrent_gated_delta_rule runs, written out: per value head, with l2-normed
    /// q and k and q scaled by dk^-½, S ← exp(g)·S; S ← S + k (β (v − Sᵀk))ᵀ; o = Sᵀq. With g [B, S, H, dk] (Kimi delta
    /// attention's recurrent_kimi_delta_attention) each key row of S decays by its own exp(g).
    /// </summary>
    static Tensor Recurrent(Tensor q, Tensor k, Tensor v, Tensor g, Tensor beta)
    {
        long b = v.shape[0], s = v.shape[1], h = v.shape[2], dv = v.shape[3], dk = k.shape[3];
        q = q.repeat_interleave(h / q.shape[2], 2);
        k = k.repeat_interleave(h / k.shape[2], 2);
        q = q / (q * q).sum(-1, keepdim: true).add(1e-6).sqrt() / Math.Sqrt(dk);
        k = k / (k * k).sum(-1, keepdim: true).add(1e-6).sqrt();
        var state = zeros(b, h, dk, dv, ScalarType.Float64);
        var outs = new List<Tensor>();
        for (long t = 0; t < s; t++)
        {
            var kt = k.select(1, t).to(ScalarType.Float64);                                  // [B, H, dk]
            var decay = g.select(1, t).to(ScalarType.Float64).exp().unsqueeze(-1);           // [B, H, dk or 1, 1]
            state = state * (g.dim() == 4 ? decay : decay.unsqueeze(-1));
            var memory = (state * kt.unsqueeze(-1)).sum(-2);                                  // Sᵀk [B, H, dv]
            var delta = (v.select(1, t).to(ScalarType.Float64) - memory) * beta.select(1, t).to(ScalarType.Float64).unsqueeze(-1);
            state = state + kt.unsqueeze(-1) * delta.unsqueeze(-2);
            outs.Add((state * q.select(1, t).to(ScalarType.Float64).unsqueeze(-1)).sum(-2));
        }
        return stack(outs, 1);
    }

    [Theory]
    [InlineData(150, 2, 4)]  // three chunks, the last padded; two value heads per key head
    [InlineData(64, 3, 3)]   // exactly one chunk
    [InlineData(5, 1, 2)]
    public void ChunkedRuleEqualsTheTokenByTokenRecurrence(int seq, int keyHeads, int valueHeads)
    {
        TorchRuntime.EnsureInitialized();
        var gen = new TorchSharp.torch.Generator(7);
        var q = randn([2, seq, keyHeads, 8], generator: gen);
        var k = randn([2, seq, keyHeads, 8], generator: gen);
        var v = randn([2, seq, valueHeads, 6], generator: gen);
        // Decays as the model makes them (g = −A·softplus(·) ≤ 0) and β in (0, 1).
        var g = -nn.functional.softplus(randn([2, seq, valueHeads], generator: gen)) * 0.5;
        var beta = randn([2, seq, valueHeads], generator: gen).sigmoid();

        var chunked = GatedDeltaRule.Chunked(q, k, v, g, beta);
        var reference = Recurrent(q, k, v, g, beta);
        var err = Fixtures.RelError(chunked.to(ScalarType.Float64), reference);
        log.WriteLine($"S={seq} Hk={keyHeads} Hv={valueHeads}: {err:E2}");
        Assert.Equal(new long[] { 2, seq, valueHeads, 6 }, chunked.shape);
        Assert.True(err < 1e-5, $"chunked vs recurrent {err:E2}");
    }

    // Kimi delta attention: one decay per key channel (g [B, S, H, dk]), as many key as value heads.
    [Theory]
    [InlineData(150, 2)]  // three chunks, the last padded
    [InlineData(64, 3)]   // exactly one chunk
    [InlineData(7, 1)]
    public void ChunkedRuleWithPerChannelDecayEqualsTheTokenByTokenRecurrence(int seq, int heads)
    {
        TorchRuntime.EnsureInitialized();
        var gen = new TorchSharp.torch.Generator(11);
        var q = randn([2, seq, heads, 8], generator: gen);
        var k = randn([2, seq, heads, 8], generator: gen);
        var v = randn([2, seq, heads, 6], generator: gen);
        // −exp(A_log)·softplus(·) per channel, A_log up to log 16 as KimiLinearForgetGate's init draws it: strong decays.
        var aLog = rand([1, 1, heads, 1], generator: gen) * Math.Log(16);
        var g = -aLog.exp() * nn.functional.softplus(randn([2, seq, heads, 8], generator: gen) - 2);
        var beta = randn([2, seq, heads], generator: gen).sigmoid();

        var chunked = GatedDeltaRule.Chunked(q, k, v, g, beta);
        var reference = Recurrent(q, k, v, g, beta);
        var err = Fixtures.RelError(chunked.to(ScalarType.Float64), reference);
        log.WriteLine($"per-channel S={seq} H={heads}: {err:E2}");
        Assert.Equal(new long[] { 2, seq, heads, 6 }, chunked.shape);
        Assert.True(err < 1e-5, $"chunked vs recurrent {err:E2}");
        // The per-channel decays matter: the same rule with each head's mean decay differs.
        var meanDecay = GatedDeltaRule.Chunked(q, k, v, g.mean([-1]), beta);
        Assert.True(Fixtures.RelError(meanDecay.to(ScalarType.Float64), reference) > 1e-3);
    }

    [Theory]
    [InlineData("qwen3_next", "in_proj_qkvz", "in_proj_ba")]
    [InlineData("qwen3_5_moe_text", "in_proj_qkv", "in_proj_z")]
    public void LoraOnTheDeltaNetProjectionsGetsGradients(string type, string inProj, string otherProj)
    {
        TorchRuntime.EnsureInitialized();
        using var h = new DisposableModel(TorchModelFactory.Load(Model(type)));
        var plan = LoraInjector.Plan(h.Model, $$"""
            {"r": 4, "lora_alpha": 8, "init_lora_weights": false,
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "{{inProj}}", "{{otherProj}}", "out_proj"]}
            """);
        var adapter = LoraInjector.Inject(h.Model, plan);
        var deltaNet = adapter.Wrappers.Select(w => w.Module).Where(m => m.Contains(".linear_attn.", StringComparison.Ordinal)).ToList();
        // Three linear-attention layers of four, three targeted projections each.
        Assert.Equal(9, deltaNet.Count);
        Assert.Contains(adapter.Wrappers, w => w.Module == $"model.layers.0.linear_attn.{inProj}");
        Assert.Contains(adapter.Wrappers, w => w.Module == "model.layers.3.self_attn.q_proj");
        Assert.Equal(plan.TrainableParameters, Measurements.CountParameters(h.Model).Trainable);

        var reference = Safetensors(type);
        var mask = reference["attention_mask"];
        var ids = reference["input_ids"];
        h.Model.Train();
        using var output = h.Model.Forward(ids, mask);
        var labels = ids.roll(-1, 1).masked_fill(mask.eq(0), -100);
        var logits = output.Logits;
        nn.functional.cross_entropy(logits.reshape(-1, logits.shape[^1]), labels.reshape(-1), ignore_index: -100).backward();

        var grads = LoraInjector.PeftNamedParameters(h.Model).ToList();
        Assert.NotEmpty(grads);
        Assert.All(grads, p =>
        {
            Assert.NotNull(p.Param.grad);
            Assert.True(p.Param.grad!.isfinite().all().item<bool>(), $"{p.Name}: non-finite gradient");
            Assert.True(p.Param.grad.abs().max().item<float>() > 0, $"{p.Name}: no gradient");
        });
        Assert.Contains(grads, p => p.Name.Contains($"linear_attn.{inProj}.lora_A", StringComparison.Ordinal));
        Assert.Contains(grads, p => p.Name.Contains("linear_attn.out_proj.lora_B", StringComparison.Ordinal));
    }

    /// <summary>Training runs in bf16: the linear attention keeps its delta rule in fp32 and rounds where transformers does.</summary>
    [Theory]
    [InlineData("qwen3_next")]
    [InlineData("qwen3_5_moe_text")]
    public void RunsInBf16CloseToFp32(string type)
    {
        TorchRuntime.EnsureInitialized();
        var reference = Safetensors(type);
        var mask = reference["attention_mask"];
        using var _ = no_grad();
        Tensor Logits(ScalarType dtype)
        {
            using var h = new DisposableModel(TorchModelFactory.Load(Model(type), dtype));
            using var output = h.Model.Forward(reference["input_ids"], mask);
            return output.Logits.to(ScalarType.Float32).clone();
        }
        var err = Fixtures.MaskedRelError(Logits(ScalarType.BFloat16), Logits(ScalarType.Float32), mask);
        log.WriteLine($"{type} bf16 vs fp32 logits: {err:E2}");
        // bf16 rounding grows layer by layer (7e-2 on qwen3_next's 0.1-std weights, 1e-2 to 2e-2 on the other MoE
        // fixtures); a dtype mix-up or a non-finite step would be of order one.
        Assert.True(err < 0.15, $"{type}: bf16 logits {err:E2} from fp32");
    }

    [Fact]
    public void MultimodalQwen35RunsItsTextModelWithTheVisionTowerInert()
    {
        TorchRuntime.EnsureInitialized();
        var text = System.Text.Json.Nodes.JsonNode.Parse(File.ReadAllText(Path.Combine(Model("qwen3_5_moe_text"), "config.json")))!;
        text.AsObject().Remove("architectures");
        string Composite(string head) => new System.Text.Json.Nodes.JsonObject
        {
            ["model_type"] = "qwen3_5_moe",
            ["architectures"] = new System.Text.Json.Nodes.JsonArray(head),
            ["text_config"] = text.DeepClone(),
            ["vision_config"] = new System.Text.Json.Nodes.JsonObject
            {
                ["depth"] = 1, ["hidden_size"] = 16, ["intermediate_size"] = 32, ["num_heads"] = 2, ["patch_size"] = 4,
                ["num_position_embeddings"] = 16, ["out_hidden_size"] = text["hidden_size"]!.DeepClone(),
            },
        }.ToJsonString();

        // The causal LM over text_config runs, and so does the image-text class on text: its vision tower is built
        // (never run) and its text model, given the fixture's weights, gives transformers' text logits.
        Assert.NotNull(TorchModelFactory.Spec(Composite("Qwen3_5MoeForCausalLM")).Runtime);
        using var mm = new DisposableModel(TorchModelFactory.Random(Composite("Qwen3_5MoeForConditionalGeneration"), 0));
        Assert.Equal(["model.visual"], mm.Model.Towers.Select(t => t.Prefix));
        using var fixture = new DisposableModel(TorchModelFactory.Load(Model("qwen3_5_moe_text")));
        var state = mm.Model.StateDict().ToDictionary(s => s.Name, s => s.Value);
        using (no_grad())
            foreach (var (n, t) in fixture.Model.StateDict())
                state[n.StartsWith("model.", StringComparison.Ordinal) ? "model.language_model." + n["model.".Length..] : n].copy_(t);
        var r = Safetensors("qwen3_5_moe_text");
        using var _ = no_grad();
        using var o = mm.Model.Forward(r["input_ids"], r["attention_mask"]);
        Assert.True(Fixtures.MaskedRelError(o.Logits, r["logits"], r["attention_mask"]) < 1e-4);
    }

    static Dictionary<string, Tensor> Safetensors(string type) =>
        IO.Safetensors.Load(Path.Combine(AppContext.BaseDirectory, "Data", "hf-moe", type, "reference.safetensors"));
}
