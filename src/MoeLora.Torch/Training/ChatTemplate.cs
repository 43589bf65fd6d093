using MoeLora.Core;

namespace MoeLora.Torch.Training;

/// <summary>
/// Chat formats for circuit-breaker data (reference §6): the one-shot form
/// <c>{user_tag}{instruction}{assistant_tag}&lt;SEPARATOR&gt;{response}</c> and full conversations. BOS comes from the
/// tokenizer's post-processor, as upstream (which tokenises the template text with add_special_tokens).
/// </summary>
public sealed record ChatTemplate(string Name, string UserTag, string AssistantTag, string Sep, Func<string, string, string> Message, string? ConversationPrefix = null)
{
    public static readonly string[] Names = ["llama3", "llama4", "qwen", "mistral", "plain"];

    public static ChatTemplate Get(string name) => name switch
    {
        "llama3" => new(name, "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", "",
            (role, c) => $"<|start_header_id|>{role}<|end_header_id|>\n\n{c}<|eot_id|>"),
        "llama4" => new(name, "<|header_start|>user<|header_end|>\n\n", "<|eot|><|header_start|>assistant<|header_end|>\n\n", "",
            (role, c) => $"<|header_start|>{role}<|header_end|>\n\n{c}<|eot|>"),
        "qwen" => new(name, "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n", "",
            (role, c) => $"<|im_start|>{role}\n{c}<|im_end|>\n"),
        "mistral" => new(name, "[INST] ", " [/INST]", " ",
            (role, c) => role == "user" ? $"[INST] {c} [/INST]" : role == "assistant" ? $" {c}</s>" : $"{c}\n\n"),
        "plain" => new(name, "User: ", "\nAssistant:", " ", (role, c) => $"{char.ToUpperInvariant(role[0])}{role[1..]}: {c}\n"),
        _ => throw new UserInputException($"--chat-template '{name}' is unknown: use {string.Join(", ", Names)}."),
    };

    /// <summary>The template a model family uses (config.json model_type).</summary>
    public static string ForModelType(string modelType) => modelType switch
    {
        "llama" => "llama3",
        "llama4" or "llama4_text" => "llama4",
        "qwen2" or "qwen3" or "qwen2_moe" or "qwen3_moe" or "qwen3_next" => "qwen",
        "mistral" or "mixtral" => "mistral",
        _ => "plain",
    };

    /// <summary>The request part of the one-shot form (before &lt;SEPARATOR&gt;).</summary>
    public string Request(string instruction) => UserTag + instruction + AssistantTag;

    /// <summary>A whole conversation (role, content) rendered as text.</summary>
    public string Conversation(IEnumerable<(string Role, string Content)> messages) =>
        (ConversationPrefix ?? "") + string.Concat(messages.Select(m => Message(m.Role, m.Content)));
}
