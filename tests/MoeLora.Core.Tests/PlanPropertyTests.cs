using System.Text.Json.Nodes;
using CsCheck;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Core.Tests;

/// <summary>Invariants that hold for every model and LoraConfig, checked on random small configs.</summary>
public class PlanPropertyTests
{
    private static readonly string[] Types = ["llama", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "llama4_text"];

    /// <summary>Random small configs of every supported family (sizes kept small so a check runs in milliseconds).</summary>
    internal static readonly Gen<JsonObject> Configs =
        from type in Gen.OneOf(Types)
        from heads in Gen.Int[1, 4]
        from headDim in Gen.Int[1, 4].Select(x => x * 4)
        from kvDiv in Gen.OneOf(1, heads)
        from layers in Gen.Int[1, 5]
        from experts in Gen.Int[2, 6]
        from inter in Gen.Int[1, 6].Select(x => x * 8)
        from step in Gen.Int[1, 3]
        from tie in Gen.Bool
        select Config(type, heads, headDim, Math.Max(1, heads / kvDiv), layers, experts, inter, step, tie);

    private static JsonObject Config(string type, int heads, int headDim, int kv, int layers, int experts, int inter, int step, bool tie)
    {
        var hidden = heads * headDim;
        var c = new JsonObject
        {
            ["model_type"] = type, ["hidden_size"] = hidden, ["num_attention_heads"] = heads, ["num_key_value_heads"] = kv,
            ["head_dim"] = headDim, ["num_hidden_layers"] = layers, ["vocab_size"] = 96, ["intermediate_size"] = inter,
            ["moe_intermediate_size"] = inter / 2, ["num_experts"] = experts, ["num_local_experts"] = experts,
            ["n_routed_experts"] = experts, ["num_experts_per_tok"] = 2, ["decoder_sparse_step"] = step,
            ["interleave_moe_layer_step"] = step, ["first_k_dense_replace"] = step - 1, ["n_shared_experts"] = 1,
            ["q_lora_rank"] = hidden / 2, ["kv_lora_rank"] = hidden / 2, ["qk_rope_head_dim"] = 4, ["qk_nope_head_dim"] = 4,
            ["v_head_dim"] = 8, ["n_group"] = 1, ["topk_group"] = 1, ["shared_expert_intermediate_size"] = inter,
            ["intermediate_size_mlp"] = inter * 2, ["tie_word_embeddings"] = tie,
        };
        return c;
    }

    private static readonly Gen<LoraConfig> Loras =
        from r in Gen.Int[1, 16]
        from names in Gen.OneOf(
            new[] { "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj" },
            new[] { "q_proj", "v_proj" },
            new[] { "o_proj", "w1", "w2", "w3" },
            new[] { "self_attn.o_proj", "down_proj", "gate_proj", "up_proj" })
        from useTp in Gen.Bool
        from dora in Gen.Bool
        from layers in Gen.Int[0, 3].Array[0, 3]
        select new LoraConfig
        {
            R = r,
            LoraAlpha = 2 * r,
            TargetModules = ModuleSelector.List(names),
            TargetParameters = useTp ? ["experts.gate_up_proj", "experts.down_proj"] : null,
            UseDora = dora && !useTp,
            LayersToTransform = layers.Length == 0 ? null : layers.Distinct().ToList(),
        };

    private static ModelSpec Spec(JsonObject c, Layout layout = Layout.V5) => ArchitectureRegistry.Build(new ModelConfig(c), layout);

    /// <summary>Plans, or null where PEFT itself refuses (nothing matched, unfused halves, ...).</summary>
    private static AdapterPlan? TryPlan(ModelSpec spec, LoraConfig lora)
    {
        try
        {
            return AdapterPlanner.Plan(spec, lora);
        }
        catch (PeftInjectionException)
        {
            return null;
        }
    }

    [Fact]
    public void Counts_equal_the_sum_of_tensor_shapes() =>
        Gen.Select(Configs, Loras).Sample((c, lora) =>
        {
            var spec = Spec(c);
            var plan = TryPlan(spec, lora);
            if (plan is null) return;
            Assert.Equal(plan.TrainableParameters, plan.TrainableTensors.Sum(t => t.NumElements));
            Assert.Equal(plan.AllParameters, spec.Tree.NumParameters + plan.LoraParameters + plan.Extras.Where(e => e.CountsInTotal).Sum(e => e.NumElements));
            Assert.Equal(plan.Targets.Sum(t => t.NumParameters), plan.LoraParameters);
            foreach (var t in plan.Targets.Where(t => t.Kind == AdapterKind.Linear))
                Assert.Equal(t.R * (t.InFeatures + t.OutFeatures) + (t.Dora ? t.OutFeatures : 0), t.NumParameters);
            foreach (var t in plan.Targets.Where(t => t.Kind == AdapterKind.Parameter))
                Assert.Equal(t.R * t.NumExperts * (t.InFeatures + t.OutFeatures), t.NumParameters);
        }, iter: 300);

    [Fact]
    public void Tree_parameters_sum_to_the_total_and_names_are_unique() =>
        Configs.Sample(c =>
        {
            var spec = Spec(c);
            Assert.Equal(spec.Tree.NumParameters, spec.Tree.Parameters.Sum(p => p.NumElements));
            Assert.Equal(spec.Tree.Modules.Count, spec.Tree.Modules.Select(m => m.Name).Distinct().Count());
            Assert.Equal(spec.Tree.Parameters.Count, spec.Tree.Parameters.Select(p => p.Name).Distinct().Count());
            Assert.Equal(c["tie_word_embeddings"]!.GetValue<bool>(), spec.Tree.Parameters.All(p => p.Name != spec.OutputEmbeddings + ".weight"));
        }, iter: 300);

    [Fact]
    public void V4_and_v5_layouts_hold_the_same_number_of_parameters() =>
        Configs.Sample(c => Assert.Equal(Spec(c, Layout.V5).Tree.NumParameters, Spec(c, Layout.V4).Tree.NumParameters), iter: 300);

    [Fact]
    public void Excluding_modules_never_adds_adapters() =>
        Gen.Select(Configs, Loras, Gen.OneOf("o_proj", "q_proj", "down_proj")).Sample((c, lora, ex) =>
        {
            var spec = Spec(c);
            var with = TryPlan(spec, lora with { ExcludeModules = ModuleSelector.List([ex]) });
            var without = TryPlan(spec, lora);
            if (with is null || without is null) return;
            Assert.Subset(without.Targets.Select(t => t.Name).ToHashSet(), with.Targets.Select(t => t.Name).ToHashSet());
        }, iter: 200);

    [Fact]
    public void Layer_filter_selects_a_subset_and_never_touches_parameter_targets() =>
        Gen.Select(Configs, Loras).Sample((c, lora) =>
        {
            var spec = Spec(c);
            var filtered = TryPlan(spec, lora with { LayersToTransform = [0] });
            var all = TryPlan(spec, lora with { LayersToTransform = null });
            if (filtered is null || all is null) return;
            Assert.Subset(all.Targets.Select(t => t.Name).ToHashSet(), filtered.Targets.Select(t => t.Name).ToHashSet());
            Assert.Equal(
                all.Targets.Where(t => t.Kind == AdapterKind.Parameter).Select(t => t.Name),
                filtered.Targets.Where(t => t.Kind == AdapterKind.Parameter).Select(t => t.Name));
            Assert.All(filtered.Targets.Where(t => t.Kind != AdapterKind.Parameter), t => Assert.True(t.Layer is null or 0));
        }, iter: 200);

    [Fact]
    public void Saved_keys_are_unique_and_drop_the_adapter_name() =>
        Gen.Select(Configs, Loras).Sample((c, lora) =>
        {
            var plan = TryPlan(Spec(c), lora);
            if (plan is null) return;
            var keys = plan.SavedTensors.Select(t => t.SavedKey!).ToList();
            Assert.Equal(keys.Count, keys.Distinct().Count());
            Assert.All(keys, k => Assert.DoesNotContain(".default", k));
            Assert.All(keys, k => Assert.StartsWith("base_model.model.", k));
        }, iter: 200);
}
