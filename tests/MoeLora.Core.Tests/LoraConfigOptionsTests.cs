using System.Text.Json.Nodes;
using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Core.Tests;

/// <summary>
/// Every PEFT 0.21 LoraConfig keyword is planned, accepted as changing nothing, or refused by name; unknown keys fail
/// as PEFT fails. Expectations come from PEFT 0.21's source (tuners/lora/config.py, layer.py, utils/other.py, config.py).
/// </summary>
public class LoraConfigOptionsTests
{
    /// <summary>PEFT 0.21's LoraConfig init fields, PeftConfig's and PeftConfigMixin's included (what adapter_config.json holds, plus runtime_config).</summary>
    private static readonly string[] Peft021Fields =
    [
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
        "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "bias", "use_rslora",
        "modules_to_save", "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
        "megatron_config", "megatron_core", "trainable_token_indices", "loftq_config", "eva_config", "corda_config",
        "lora_ga_config", "use_dora", "velora_config", "alora_invocation_tokens", "use_qalora", "qalora_group_size",
        "monteclora_config", "layer_replication", "runtime_config", "lora_bias", "target_parameters", "use_bdlora",
        "arrow_config", "kasa_config", "ensure_weight_tying",
    ];

    private static ModelSpec Spec(string type = "qwen3_moe", bool tie = false) => ArchitectureRegistry.Build(new ModelConfig(new JsonObject
    {
        ["model_type"] = type, ["hidden_size"] = 32, ["num_attention_heads"] = 4, ["num_key_value_heads"] = 2, ["head_dim"] = 8,
        ["num_hidden_layers"] = 2, ["vocab_size"] = 100, ["intermediate_size"] = 48, ["moe_intermediate_size"] = 16,
        ["num_experts"] = 4, ["num_experts_per_tok"] = 2, ["decoder_sparse_step"] = 1, ["tie_word_embeddings"] = tie,
    }), Layout.V5);

    private static LoraConfig Kwargs(string json) => LoraConfig.FromJson(json, "kwargs", LoraConfigSource.Kwargs);

    private static AdapterPlan Plan(string json, ModelSpec? spec = null) => AdapterPlanner.Plan(spec ?? Spec(), Kwargs(json));

    [Fact]
    public void Every_peft_field_has_exactly_one_decision()
    {
        Assert.Equal(Peft021Fields.Order(StringComparer.Ordinal), LoraConfigFields.All.Select(f => f.Name).Order(StringComparer.Ordinal));
        Assert.All(LoraConfigFields.All, f => Assert.False(string.IsNullOrWhiteSpace(f.Why)));
    }

    [Fact]
    public void Every_field_not_refused_is_accepted_with_its_default_and_every_refused_one_is_refused_when_set()
    {
        foreach (var field in LoraConfigFields.All)
        {
            var active = field.Name switch
            {
                "use_qalora" => "true",
                "alora_invocation_tokens" or "layer_replication" => "[[0, 1]]",
                "megatron_config" => "{\"tensor_model_parallel_size\": 2}",
                _ => "{}",
            };
            var json = $"{{\"target_modules\": [\"q_proj\"], \"{field.Name}\": {active}}}";
            if (field.Role == LoraFieldRole.Refused)
            {
                var e = Assert.ThrowsAny<PeftConfigException>(() => Kwargs(json));
                Assert.Contains(field.Name, e.Message);
                Assert.Contains("MoeLora cannot plan it yet", e.Message);
                Assert.DoesNotContain('\n', e.Message);
            }
        }
        // Fields that change nothing are accepted with a value, and the plan equals the plan without them.
        var plain = Plan("""{"target_modules": ["q_proj"]}""");
        var noisy = Plan("""
            {"target_modules": ["q_proj"], "auto_mapping": {"base_model_class": "X"}, "peft_version": "0.21.0",
             "base_model_name_or_path": "x/y", "revision": "main", "megatron_core": "megatron.core", "qalora_group_size": 32,
             "runtime_config": {"ephemeral_gpu_offload": true}, "loftq_config": {"loftq_bits": 4}, "eva_config": {},
             "lora_ga_config": {}, "peft_type": "LORA", "inference_mode": false}
            """);
        Assert.Equal(plain.TrainableParameters, noisy.TrainableParameters);
        Assert.Equal(plain.SavedTensors.Select(t => t.SavedKey), noisy.SavedTensors.Select(t => t.SavedKey));
    }

    [Fact]
    public void Unknown_keyword_argument_is_peft_s_type_error_with_a_hint()
    {
        var e = Assert.Throws<PeftInjectionException>(() => Kwargs("""{"r": 4, "lora_aplha": 8}"""));
        Assert.Equal("TypeError", e.PeftErrorType);
        Assert.StartsWith("TypeError: LoraConfig.__init__() got an unexpected keyword argument 'lora_aplha'", e.Message);
        Assert.Contains("did you mean 'lora_alpha'", e.Message);
        var far = Assert.Throws<PeftInjectionException>(() => Kwargs("""{"completely_unrelated_option": 1}"""));
        Assert.DoesNotContain("did you mean", far.Message);
        // Attributes PEFT sets in __post_init__ are not init fields.
        Assert.Throws<PeftInjectionException>(() => Kwargs("""{"modules_to_tie": ["lm_head"]}"""));
    }

    [Fact]
    public void Unknown_adapter_config_key_is_dropped_with_peft_s_warning()
    {
        var c = LoraConfig.FromJson("""{"peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "zeta_option": 1, "alpha_option": 2, "runtime_config": {}}""", "adapter_config.json");
        Assert.Equal(["zeta_option", "alpha_option"], c.IgnoredKeys);
        Assert.Contains(c.LoadWarnings, w => w.StartsWith("Unexpected keyword arguments ['alpha_option', 'zeta_option'] for class LoraConfig, these are ignored.", StringComparison.Ordinal));
        Assert.Contains(c.LoadWarnings, w => w.Contains("`runtime_config` key", StringComparison.Ordinal));
        // Without peft_type, PEFT's forward-compatible path refuses the file.
        var e = Assert.Throws<PeftInjectionException>(() => LoraConfig.FromJson("""{"r": 4, "zeta_option": 1}""", "f", LoraConfigSource.AdapterConfig));
        Assert.Contains("missing required keys: {'peft_type'}", e.Message);
        // A saved adapter is analysed for training: inference_mode=true is what save_pretrained writes.
        Assert.True(LoraConfig.FromJson("""{"peft_type": "LORA", "inference_mode": true, "target_modules": ["q_proj"]}""", "f").R == 8);
        Assert.Contains("inference_mode", Assert.ThrowsAny<PeftConfigException>(() => Kwargs("""{"inference_mode": true}""")).Message);
    }

    [Fact]
    public void Post_init_errors_are_peft_s()
    {
        Assert.Equal("The argument lora_bias=True is only supported with init_lora_weights=True or False, got init_lora_weights=gaussian instead.",
            Assert.ThrowsAny<PeftConfigException>(() => Kwargs("""{"lora_bias": true, "init_lora_weights": "gaussian"}""")).Message);
        Assert.Equal("The argument lora_bias=True is not supported for DoRA, please pass use_dora=False",
            Assert.ThrowsAny<PeftConfigException>(() => Kwargs("""{"lora_bias": true, "use_dora": true}""")).Message);
        Assert.Equal("DoRA does not support megatron_core, please set `use_dora=False`.",
            Assert.ThrowsAny<PeftConfigException>(() => Kwargs("""{"use_dora": true, "megatron_config": {"a": 1}}""")).Message);
        Assert.StartsWith("Invalid task type: 'CAUSAL'.", Assert.ThrowsAny<PeftConfigException>(() => Kwargs("""{"task_type": "CAUSAL"}""")).Message);
        Assert.Equal("TypeError: `target_parameters` must be a list of strings or None.",
            Assert.ThrowsAny<PeftConfigException>(() => Kwargs("""{"target_parameters": "experts.down_proj"}""")).Message);
        Assert.Equal("TypeError: `KasaConfig` must be a `KasaConfig`, a dict, or None.",
            Assert.ThrowsAny<PeftConfigException>(() => Kwargs("""{"kasa_config": 3}""")).Message);
        Assert.Equal("`loftq_config` must be specified when `init_lora_weights` is 'loftq'.",
            Assert.ThrowsAny<PeftConfigException>(() => Kwargs("""{"init_lora_weights": "loftq"}""")).Message);
        Assert.Contains(Kwargs("""{"target_modules": ["q_proj"], "eva_config": {}}""").LoadWarnings, w => w.Contains("`eva_config` specified but will be ignored", StringComparison.Ordinal));
    }

    [Theory]
    [InlineData("pissa")]
    [InlineData("pissa_niter_4")]
    [InlineData("corda")]
    [InlineData("olora")]
    [InlineData("eva")]
    [InlineData("lora_ga")]
    public void Weight_or_data_driven_inits_are_refused_by_name(string init)
    {
        var e = Assert.ThrowsAny<PeftConfigException>(() => Kwargs($$"""{"target_modules": ["q_proj"], "init_lora_weights": "{{init}}"}"""));
        Assert.Contains($"init_lora_weights='{init}'", e.Message);
        Assert.Contains("MoeLora cannot plan it yet", e.Message);
    }

    [Theory]
    [InlineData("true")]
    [InlineData("false")]
    [InlineData("\"gaussian\"")]
    [InlineData("\"Gaussian\"")]
    [InlineData("\"orthogonal\"")]
    [InlineData("\"MiCA\"")]
    public void Inits_that_change_only_values_keep_every_count(string init)
    {
        var plain = Plan("""{"r": 4, "target_modules": ["q_proj", "embed_tokens"]}""");
        var other = Plan($$"""{"r": 4, "target_modules": ["q_proj", "embed_tokens"], "init_lora_weights": {{init}}}""");
        Assert.Equal(plain.TrainableParameters, other.TrainableParameters);
        Assert.Equal(plain.AllParameters, other.AllParameters);
        Assert.Equal(plain.SavedTensors.Select(t => t.SavedKey), other.SavedTensors.Select(t => t.SavedKey));
    }

    [Fact]
    public void Mica_freezes_lora_b_but_still_counts_and_saves_it()
    {
        var plain = Plan("""{"r": 4, "target_modules": ["q_proj", "embed_tokens"]}""");
        var mica = Plan("""{"r": 4, "target_modules": ["q_proj", "embed_tokens"], "init_lora_weights": "mica"}""");
        var frozenB = mica.Targets.SelectMany(t => t.Tensors).Where(t => t.RuntimeName.Contains("lora_B.") || t.RuntimeName.Contains("lora_embedding_B.")).ToList();
        Assert.NotEmpty(frozenB);
        Assert.All(frozenB, t => Assert.False(t.Trainable));
        Assert.Equal(plain.TrainableParameters - frozenB.Sum(t => t.NumElements), mica.TrainableParameters);
        Assert.Equal(plain.AllParameters, mica.AllParameters);
        Assert.Equal(plain.SavedTensors.Select(t => t.SavedKey), mica.SavedTensors.Select(t => t.SavedKey));
        Assert.DoesNotContain(mica.TrainableTensors, t => t.RuntimeName.Contains("_B", StringComparison.Ordinal));
    }

    [Fact]
    public void Init_errors_raised_by_update_layer()
    {
        Assert.Equal("Invalid or unsupported variant combination: ('mica', 'use_dora')",
            Assert.ThrowsAny<PeftConfigException>(() => Plan("""{"target_modules": ["q_proj"], "init_lora_weights": "mica", "use_dora": true}""")).Message);
        Assert.Equal("Invalid or unsupported variant combination: ('mica',)",
            Assert.ThrowsAny<PeftConfigException>(() => Plan("""{"target_modules": [], "target_parameters": ["experts.down_proj"], "init_lora_weights": "mica"}""")).Message);
        Assert.StartsWith("MiCA requires `r` <= min(in_features, out_features) but got r=64",
            Assert.ThrowsAny<PeftConfigException>(() => Plan("""{"r": 64, "target_modules": ["q_proj"], "init_lora_weights": "mica"}""")).Message);
        Assert.Equal("Orthogonal initialization requires the LoRA rank to be even, got 3 instead.",
            Assert.ThrowsAny<PeftConfigException>(() => Plan("""{"r": 3, "target_modules": ["q_proj"], "init_lora_weights": "orthogonal"}""")).Message);
        Assert.Equal("Unknown initialization init_lora_weights='kaiming'",
            Assert.ThrowsAny<PeftConfigException>(() => Plan("""{"target_modules": ["q_proj"], "init_lora_weights": "kaiming"}""")).Message);
        // lora.Embedding has no such check: an unknown value on an embedding only is accepted.
        Assert.NotEmpty(Plan("""{"target_modules": ["embed_tokens"], "init_lora_weights": "kaiming"}""").Targets);
        Assert.Contains("MoeLora cannot plan it yet",
            Assert.ThrowsAny<PeftConfigException>(() => Plan("""{"r": 4, "target_modules": [], "target_parameters": ["experts.down_proj"], "init_lora_weights": "orthogonal"}""")).Message);
        Assert.ThrowsAny<PeftConfigException>(() => Kwargs("""{"init_lora_weights": 1}"""));
    }

    [Fact]
    public void Fan_in_fan_out_is_cleared_by_the_first_linear_before_parameters_are_wrapped()
    {
        var both = Plan("""{"target_modules": ["q_proj"], "target_parameters": ["experts.down_proj"], "fan_in_fan_out": true}""");
        Assert.Contains(both.PeftWarnings, w => w.StartsWith("fan_in_fan_out is set to True", StringComparison.Ordinal));
        Assert.False(both.Effective.FanInFanOut);
        Assert.Equal("lora.ParamWrapper does not work with fan_in_fan_out.",
            Assert.ThrowsAny<PeftConfigException>(() => Plan("""{"target_modules": [], "target_parameters": ["experts.down_proj"], "fan_in_fan_out": true}""")).Message);
    }

    [Fact]
    public void Trainable_token_indices_add_one_delta_per_embedding()
    {
        var plain = Plan("""{"r": 4, "target_modules": ["q_proj"]}""");
        var list = Plan("""{"r": 4, "target_modules": ["q_proj"], "trainable_token_indices": [1, 5, 7]}""");
        var dict = Plan("""{"r": 4, "target_modules": ["q_proj"], "trainable_token_indices": {"embed_tokens": [1, 5, 7]}}""");
        const string key = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta";
        foreach (var p in new[] { list, dict })
        {
            Assert.Equal(plain.TrainableParameters + 3 * 32, p.TrainableParameters);
            Assert.Equal(plain.AllParameters + 3 * 32, p.AllParameters);
            Assert.Contains(p.SavedTensors, t => t.SavedKey == key && t.Shape.SequenceEqual(new long[] { 3, 32 }));
            Assert.Equal(key + ".default", p.TrainableTensors[0].RuntimeName);
        }
        // Tied LM head: shares the embedding's delta, so nothing more is counted or saved.
        var tied = Plan("""{"r": 4, "target_modules": ["q_proj"], "trainable_token_indices": [1, 5, 7]}""", Spec(tie: true));
        Assert.Single(tied.SavedTensors, t => t.SavedKey!.Contains("trainable_tokens_delta", StringComparison.Ordinal));
    }

    [Fact]
    public void Trainable_token_indices_errors()
    {
        Assert.Equal("Target modules {'wte'} not found in the base model. Please check the target modules and try again.",
            Assert.ThrowsAny<PeftConfigException>(() => Plan("""{"target_modules": ["q_proj"], "trainable_token_indices": {"wte": [1]}}""")).Message);
        Assert.StartsWith("The embedding layer is already marked to be trained fully",
            Assert.ThrowsAny<PeftConfigException>(() => Plan("""{"target_modules": ["q_proj"], "modules_to_save": ["embed_tokens"], "trainable_token_indices": {"embed_tokens": [1]}}""")).Message);
        Assert.Contains("MoeLora cannot plan it yet",
            Assert.ThrowsAny<PeftConfigException>(() => Plan("""{"target_modules": ["q_proj", "embed_tokens"], "trainable_token_indices": [1]}""")).Message);
        Assert.Contains("out of range",
            Assert.ThrowsAny<PeftConfigException>(() => Plan("""{"target_modules": ["q_proj"], "trainable_token_indices": [100]}""")).Message);
        Assert.Contains("MoeLora cannot plan it yet",
            Assert.ThrowsAny<PeftConfigException>(() => Plan("""{"target_modules": ["q_proj"], "trainable_token_indices": {"q_proj": [1]}}""")).Message);
    }

    [Fact]
    public void Kwargs_round_trip_keeps_the_new_options()
    {
        var c = Kwargs("""{"r": 4, "target_modules": ["q_proj"], "init_lora_weights": "mica", "trainable_token_indices": {"embed_tokens": [1, 2]}}""");
        var again = Kwargs(c.ToKwargsJson().ToJsonString());
        Assert.Equal("mica", again.InitLoraWeights!.GetValue<string>());
        Assert.Equal([1, 2], again.TrainableTokenIndices![0].Value);
    }
}
