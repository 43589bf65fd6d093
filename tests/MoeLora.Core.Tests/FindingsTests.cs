using MoeLora.Core.Analysis;
using MoeLora.Core.Architectures;
using MoeLora.Core.Catalog;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Core.Tests;

/// <summary>Each warning fires where the analysis says it should, and each recommendation is PEFT-valid.</summary>
public class FindingsTests
{
    private static LoraReport Report(string id, LoraConfig? lora = null, Layout layout = Layout.V5) =>
        LoraReport.Build(ArchitectureRegistry.Build(new ModelConfig(ModelCatalog.TryGetConfig(id)!), layout),
            lora ?? LoraConfig.SeedDefault, null, new ReportOptions { ModelId = id });

    private static HashSet<string> Codes(LoraReport r) => r.Warnings.Select(w => w.Code).ToHashSet();

    private static LoraConfig Targets(string[] modules, string[]? parameters = null) =>
        new() { R = 16, LoraAlpha = 32, TargetModules = ModuleSelector.List(modules), TargetParameters = parameters };

    [Fact]
    public void Seed_targets_miss_mixtral_experts_and_the_fix_reaches_them()
    {
        var r = Report("mistralai/Mixtral-8x7B-v0.1");
        Assert.Contains("experts_missed", Codes(r));
        var fix = r.Recommendations.First(x => x.Title == "Reach the routed experts");
        Assert.Equal(223346688, fix.TrainableParameters); // the oracle's attention + experts variant
        Assert.DoesNotContain("experts_missed", Codes(Report("mistralai/Mixtral-8x7B-v0.1", fix.Config)));
    }

    [Fact]
    public void Router_and_vision_adapters_are_flagged() =>
        Assert.Superset(new HashSet<string> { "router_adapted", "vision_adapted" },
            Codes(Report("meta-llama/Llama-4-Scout-17B-16E-Instruct", new LoraConfig { R = 8, LoraAlpha = 16, TargetModules = ModuleSelector.Regex("all-linear") })));

    [Fact]
    public void Rewrite_that_drops_shared_experts_and_dense_mlps_is_flagged()
    {
        var r = Report("deepseek-ai/DeepSeek-V3");
        var w = Assert.Single(r.Warnings, x => x.Code == "conversion_dropped");
        Assert.Contains("shared expert", w.Message);
        Assert.Contains("dense MLP", w.Message);
    }

    [Fact]
    public void Llama4_expert_orientation_is_flagged_and_gpt_oss_is_not()
    {
        var tp = Targets(["q_proj"], ["experts.gate_up_proj", "experts.down_proj"]);
        Assert.Contains("expert_orientation", Codes(Report("meta-llama/Llama-4-Scout-17B-16E-Instruct", tp)));
        Assert.DoesNotContain("expert_orientation", Codes(Report("openai/gpt-oss-20b", tp)));
        Assert.DoesNotContain("expert_orientation", Codes(Report("mistralai/Mixtral-8x7B-v0.1", tp)));
    }

    [Fact]
    public void Layer_filter_beyond_the_model_and_ignored_by_parameters()
    {
        var cfg = Targets(["q_proj"], ["experts.down_proj"]) with { LayersToTransform = [0, 99] };
        Assert.Superset(new HashSet<string> { "layer_out_of_range", "layers_ignored_by_parameters" }, Codes(Report("Qwen/Qwen3-30B-A3B", cfg)));
    }

    [Fact]
    public void Dbrx_stacked_expert_lora_is_one_update_for_all_experts()
    {
        var config = new System.Text.Json.Nodes.JsonObject
        {
            ["model_type"] = "dbrx", ["d_model"] = 64, ["n_heads"] = 4, ["n_layers"] = 2, ["vocab_size"] = 128,
            ["attn_config"] = new System.Text.Json.Nodes.JsonObject { ["kv_n_heads"] = 2, ["rope_theta"] = 10000.0 },
            ["ffn_config"] = new System.Text.Json.Nodes.JsonObject { ["ffn_hidden_size"] = 48, ["moe_num_experts"] = 4, ["moe_top_k"] = 2 },
        };
        var spec = ArchitectureRegistry.Build(new ModelConfig(config), Layout.V5);
        var r = LoraReport.Build(spec, Targets(["Wqkv"], ["mlp.w1", "mlp.v1", "mlp.w2"]), null, new ReportOptions());
        Assert.Equal(4, r.Experts.ExpertsWithAdapters);
        Assert.StartsWith("one LoRA over the stacked experts", r.Experts.Mode);
        // One rank-16 update of each [E·F, H] = [192, 64] matrix per layer: 16·(192 + 64) × 3 × 2 layers.
        Assert.Equal(2 * 3 * 16 * (192 + 64), r.Plan.Targets.Where(t => t.Location == ModuleLocation.RoutedExpert).Sum(t => t.NumParameters));
    }

    // DeepSeek-V4's o_a_proj is an nn.Linear subclass used block-diagonally: PEFT wraps it (all-linear reaches it) and
    // saves the adapter, but the forward fails. all-linear warns; the attention targets without it do not.
    [Fact]
    public void Lora_on_deepseek_v4_grouped_o_a_proj_warns_that_the_forward_fails()
    {
        var spec = ArchitectureRegistry.Build(new ModelConfig(new System.Text.Json.Nodes.JsonObject { ["model_type"] = "deepseek_v4" }), Layout.V5);
        var all = LoraReport.Build(spec, new LoraConfig { R = 8, LoraAlpha = 16, TargetModules = ModuleSelector.Regex("all-linear") }, null, new ReportOptions());
        var w = Assert.Single(all.Warnings, x => x.Code == "peft_forward_fails");
        int layers = (int)spec.NumHiddenLayers;
        Assert.StartsWith($"{layers} adapters sit on DeepseekV4GroupedLinear modules", w.Message);
        Assert.Contains("o_a_proj", w.Message);
        var without = LoraReport.Build(spec, Targets(["q_b_proj", "kv_proj", "o_b_proj"]), null, new ReportOptions());
        Assert.DoesNotContain("peft_forward_fails", Codes(without));
        Assert.True(without.Plan.Targets.Count > 0);
    }

    // transformers 5.17 builds Doge with is_moe but its forward fails: the report says so, the dense Doge does not warn,
    // and the runtime refuses the MoE one in one line naming the cause.
    [Fact]
    public void Doge_with_is_moe_warns_that_transformers_cannot_run_it()
    {
        ModelSpec Doge(bool moe) => ArchitectureRegistry.Build(new ModelConfig(new System.Text.Json.Nodes.JsonObject
        {
            ["model_type"] = "doge", ["hidden_size"] = 32, ["intermediate_size"] = 48, ["num_hidden_layers"] = 2, ["num_attention_heads"] = 4,
            ["vocab_size"] = 64, ["is_moe"] = moe, ["num_experts"] = 16, ["num_experts_per_tok"] = 4,
        }), Layout.V5);
        var moe = LoraReport.Build(Doge(true), LoraConfig.SeedDefault, null, new ReportOptions());
        var w = Assert.Single(moe.Warnings, x => x.Code == "transformers_forward_fails");
        Assert.Contains("F.dropout", w.Message);
        Assert.Null(moe.Plan.Spec.Runtime);
        var refusal = Assert.Throws<NotSupportedException>(() => moe.Plan.Spec.RequireRuntime());
        Assert.Contains("passes the CDMoE's (states, router logits) tuple to dropout", refusal.Message);
        Assert.DoesNotContain('\n', refusal.Message);
        var dense = LoraReport.Build(Doge(false), LoraConfig.SeedDefault, null, new ReportOptions());
        Assert.DoesNotContain("transformers_forward_fails", Codes(dense));
        Assert.NotNull(dense.Plan.Spec.Runtime);
    }

    [Fact]
    public void Dense_models_get_no_moe_advice() =>
        Assert.DoesNotContain(Report("meta-llama/Meta-Llama-3.1-8B").Recommendations, r => r.Title.Contains("router", StringComparison.OrdinalIgnoreCase));

    [Fact]
    public void Every_recommended_config_plans_under_peft_rules()
    {
        foreach (var id in ModelCatalog.Entries.Select(e => e.Id))
        {
            var r = Report(id);
            Assert.All(r.Recommendations.Where(x => x.Config is not null), x => Assert.NotNull(x.TrainableParameters));
        }
    }

    [Fact]
    public void A_regex_resolved_to_leaf_names_warns_once_that_its_layer_scope_is_dropped()
    {
        var r = Report("Qwen/Qwen3-30B-A3B", new LoraConfig { R = 16, LoraAlpha = 32, TargetModules = ModuleSelector.Regex(@".*layers\.(0|1)\..*(q_proj|v_proj)") });
        var w = Assert.Single(r.Warnings, x => x.Code == "regex_scope_dropped");
        Assert.Contains("q_proj, v_proj", w.Message);
        Assert.Equal(96, r.Plan.Targets.Count); // every layer, not layers 0 and 1
        var note = Assert.Single(r.Breakdown).Note!;
        Assert.DoesNotContain("rewrote  onto", note);
        Assert.DoesNotContain("rewrote onto", note);
        // A regex that PEFT leaves alone keeps its scope: no warning.
        Assert.DoesNotContain("regex_scope_dropped", Codes(Report("Qwen/Qwen3-30B-A3B", new LoraConfig { R = 16, LoraAlpha = 32, TargetModules = ModuleSelector.Regex(@".*layers\.(0|1)\..*(q_proj|v_proj)") }, Layout.V4)));
    }

    [Fact]
    public void W1_and_w3_rows_say_they_share_the_fused_gate_up_proj()
    {
        var r = Report("mistralai/Mixtral-8x7B-v0.1", Targets(["w1", "w2", "w3"]));
        Assert.Contains("the same adapters as w3", r.Breakdown.Single(x => x.Target == "w1").Note);
        Assert.Contains("the same adapters as w1", r.Breakdown.Single(x => x.Target == "w3").Note);
        Assert.DoesNotContain("the same adapters", r.Breakdown.Single(x => x.Target == "w2").Note);
    }

    [Fact]
    public void Every_recommendation_changes_what_is_trained()
    {
        foreach (var id in new[] { "meta-llama/Llama-4-Scout-17B-16E-Instruct", "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen3-30B-A3B", "deepseek-ai/DeepSeek-V3" })
            foreach (var lora in new[] { LoraConfig.SeedDefault, Targets([], ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"]) })
            {
                LoraReport r;
                try { r = Report(id, lora); }
                catch (PeftConfigException) { continue; } // target_parameters that this model lacks
                Assert.All(r.Recommendations.Where(x => x.TrainableParameters is not null),
                    x => Assert.NotEqual(r.Plan.TrainableParameters, x.TrainableParameters));
            }
    }
}
