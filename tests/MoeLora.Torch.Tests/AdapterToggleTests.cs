using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>PEFT's <c>disable_adapter()</c>: every LoRA kind computes the base model while disabled.</summary>
public class AdapterToggleTests
{
    public AdapterToggleTests() => TorchRuntime.EnsureInitialized();

    public static TheoryData<string, string, string> Cases => new()
    {
        { "linear", "llama", """{"target_modules": ["q_proj", "v_proj", "down_proj"]}""" },
        { "dora", "llama", """{"target_modules": ["q_proj", "v_proj", "down_proj"], "use_dora": true}""" },
        { "fused experts", "qwen3_moe", """{"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}""" },
        { "fused experts (is_transposed, biases)", "gpt_oss", """{"target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}""" },
        { "2-D router weight", "qwen3_moe", """{"target_parameters": ["mlp.gate.weight"]}""" },
        { "2-D router weight (deepseek)", "deepseek_v3", """{"target_parameters": ["mlp.gate.weight"]}""" },
        { "2-D router weight on a Linear (llama4)", "llama4_text", """{"target_parameters": ["feed_forward.router.weight"]}""" },
    };

    [Theory]
    [MemberData(nameof(Cases))]
    public void DisabledAdaptersGiveTheBaseModelsLogits(string kind, string type, string lora)
    {
        var dir = Path.Combine(Fixtures.Dir(type), "model");
        using var h = new DisposableModel(TorchModelFactory.Load(dir));
        var reference = Fixtures.Reference(type);
        var ids = reference["input_ids"];
        var mask = reference["attention_mask"];
        using var _ = no_grad();
        h.Model.Eval();
        using var baseline = h.Model.Forward(ids, mask);
        // init_lora_weights=false: B is non-zero, so the adapter changes the output.
        var json = System.Text.Json.Nodes.JsonNode.Parse(lora)!.AsObject();
        json["r"] = 4; json["lora_alpha"] = 8; json["init_lora_weights"] = false;
        var plan = LoraInjector.Plan(File.ReadAllText(Path.Combine(dir, "config.json")), json.ToJsonString());
        LoraInjector.Inject(h.Model, plan, seed: 3);
        using var adapted = h.Model.Forward(ids, mask);
        Assert.True(Fixtures.MaskedRelError(adapted.Logits, baseline.Logits, mask) > 1e-4, $"{kind}: the adapter does not change the logits");
        using (LoraInjector.DisableAdapters(h.Model))
        {
            using var disabled = h.Model.Forward(ids, mask);
            Assert.True(disabled.Logits.equal(baseline.Logits).all().item<bool>(),
                $"{kind}: disabled adapters differ from the base model by {Fixtures.MaskedRelError(disabled.Logits, baseline.Logits, mask):E2}");
        }
        using var again = h.Model.Forward(ids, mask);
        Assert.True(again.Logits.equal(adapted.Logits).all().item<bool>(), $"{kind}: re-enabled adapters differ from before");
    }
}
