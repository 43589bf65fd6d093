using MoeLora.Torch.Text;
using System.Text.Json.Nodes;
using MoeLora.Core;

namespace MoeLora.Torch.Training;

/// <summary>
/// Training presets. The reference recipe (r=16, alpha=16, dropout 0.05, q/k/v/o/gate/up/down_proj, lr 1e-4 constant,
/// 150 steps, batch 16, lengths 512+512/1024, target layers 10,20 of 32) scaled to each model's depth: target layers at
/// about L/3 and 2L/3 as hidden_states indices. <c>tiny</c> is a random 6-layer Mixtral-style MoE (seed 0) with a
/// byte-level tokenizer that trains on CPU in about a minute.
/// </summary>
public sealed record TrainPreset(string Name, string? ModelId, int[] TargetLayers, double Alpha, int BatchSize, int TotalSteps,
    double LearningRate, CbLengths Lengths, int R, double LoraAlpha, double Dropout, string[] TargetModules, string[] TargetParameters,
    string InitLoraWeights = "true")
{
    static readonly string[] Seed7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

    public static readonly IReadOnlyDictionary<string, TrainPreset> All = new Dictionary<string, TrainPreset>
    {
        ["llama-3-8b"] = new("llama-3-8b", "meta-llama/Meta-Llama-3-8B-Instruct", [10, 20], 10, 16, 150, 1e-4, new(), 16, 16, 0.05, Seed7, []),
        ["mixtral-8x7b"] = new("mixtral-8x7b", "mistralai/Mixtral-8x7B-Instruct-v0.1", [10, 20], 5, 16, 150, 1e-4, new(), 16, 16, 0.0,
            ["q_proj", "k_proj", "v_proj", "o_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
        ["qwen3-30b-a3b"] = new("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", [16, 32], 5, 16, 150, 1e-4, new(), 16, 16, 0.0,
            ["q_proj", "k_proj", "v_proj", "o_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
        ["llama-4-scout"] = new("llama-4-scout", "meta-llama/Llama-4-Scout-17B-16E-Instruct", [16, 32], 5, 16, 150, 1e-4, new(), 16, 16, 0.05, Seed7, []),
        ["tiny"] = new("tiny", null, [2, 4], 5, 4, 150, 1e-3, new(80, 64, 96), 8, 16, 0.0,
            ["q_proj", "k_proj", "v_proj", "o_proj"], ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    };

    public static TrainPreset Get(string name) => All.TryGetValue(name, out var p) ? p
        : throw new UserInputException($"--preset '{name}' is unknown: use {string.Join(", ", All.Keys)}.");

    public static readonly string[] TinySpecials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|pad|>"];

    /// <summary>The tiny model's config.json (Mixtral, transformers-v5 fused experts; vocab = the tiny tokenizer's).</summary>
    public static string TinyConfigJson() => new JsonObject
    {
        ["architectures"] = new JsonArray("MixtralForCausalLM"),
        ["model_type"] = "mixtral",
        ["vocab_size"] = 256 + TinySpecials.Length,
        ["hidden_size"] = 64,
        ["intermediate_size"] = 96,
        ["num_hidden_layers"] = 6,
        ["num_attention_heads"] = 4,
        ["num_key_value_heads"] = 2,
        ["head_dim"] = 16,
        ["num_local_experts"] = 4,
        ["num_experts_per_tok"] = 2,
        ["hidden_act"] = "silu",
        ["max_position_embeddings"] = 256,
        ["rms_norm_eps"] = 1e-5,
        ["rope_theta"] = 10000.0,
        ["initializer_range"] = 0.1,
        ["tie_word_embeddings"] = false,
        ["bos_token_id"] = 256,
        ["eos_token_id"] = 257,
        ["pad_token_id"] = 261,
    }.ToJsonString();

    /// <summary>A PEFT adapter_config.json for this preset (layers_to_transform = blocks 0..max(target), as upstream).</summary>
    public string AdapterConfigJson(string? baseModel, IReadOnlyList<int> layersToTransform) => new JsonObject
    {
        ["alpha_pattern"] = new JsonObject(), ["base_model_name_or_path"] = baseModel, ["bias"] = "none", ["fan_in_fan_out"] = false,
        ["inference_mode"] = true, ["init_lora_weights"] = InitLoraWeights == "true" ? true : InitLoraWeights == "false" ? false : InitLoraWeights,
        ["layers_to_transform"] = new JsonArray(layersToTransform.Select(x => (JsonNode)x).ToArray()),
        ["lora_alpha"] = LoraAlpha, ["lora_dropout"] = Dropout, ["modules_to_save"] = null, ["peft_type"] = "LORA", ["r"] = R,
        ["rank_pattern"] = new JsonObject(), ["target_modules"] = new JsonArray(TargetModules.Select(x => (JsonNode)x).ToArray()),
        ["target_parameters"] = TargetParameters.Length == 0 ? null : new JsonArray(TargetParameters.Select(x => (JsonNode)x).ToArray()),
        ["task_type"] = "CAUSAL_LM", ["use_dora"] = false, ["use_rslora"] = false,
    }.ToJsonString();

    public static string TinyTokenizerJson() => HfTokenizer.ByteLevelJson(TinySpecials, "<|begin_of_text|>");
}
