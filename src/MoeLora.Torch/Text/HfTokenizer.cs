using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using Microsoft.ML.Tokenizers;

namespace MoeLora.Torch.Text;

/// <summary>
/// A model's <c>tokenizer.json</c> read into Microsoft.ML.Tokenizers: byte-level BPE (Llama 3/4, Qwen, gpt-oss,
/// DeepSeek-V3) becomes a <see cref="BpeTokenizer"/> with the file's vocabulary, merges, Split regex and added tokens.
/// Microsoft.ML.Tokenizers 2.0.1 has no reader for tokenizer.json itself, and SentencePiece-style BPE
/// (Mixtral: Metaspace / byte_fallback) is refused with a clear message; pass token ids instead (<c>--inputs</c>
/// or JSONL lines with <c>input_ids</c>). BOS is prepended when the post-processor's template starts with it.
/// </summary>
public sealed class HfTokenizer
{
    readonly Tokenizer _tokenizer;
    readonly int? _bos;

    HfTokenizer(Tokenizer tokenizer, int? bos) { _tokenizer = tokenizer; _bos = bos; }

    public static HfTokenizer Load(string? modelDir)
    {
        var path = modelDir is null ? null : Path.Combine(modelDir, "tokenizer.json");
        if (path is null || !File.Exists(path))
            throw new FileNotFoundException($"text prompts need the model's tokenizer.json{(modelDir is null ? "" : $" (not in {modelDir})")}; pass token ids instead (--inputs FILE.safetensors, or JSONL lines with \"input_ids\")");
        return Parse(File.ReadAllText(path), path);
    }

    public static HfTokenizer Parse(string json, string source)
    {
        var o = JsonNode.Parse(json)?.AsObject() ?? throw new FormatException($"{source}: empty");
        var model = o["model"]?.AsObject() ?? throw new FormatException($"{source}: no model");
        var type = model["type"]?.GetValue<string>() ?? "BPE";
        if (type != "BPE") throw new NotSupportedException($"{source}: tokenizer model '{type}' is not supported (byte-level BPE only); pass input_ids instead");
        if (model["byte_fallback"]?.GetValue<bool>() == true || Find(o["pre_tokenizer"], "Metaspace") is not null)
            throw new NotSupportedException($"{source}: SentencePiece-style BPE (Metaspace/byte_fallback) is not supported by Microsoft.ML.Tokenizers' BPE reader here; pass input_ids instead");
        if (Find(o["pre_tokenizer"], "ByteLevel") is null)
            throw new NotSupportedException($"{source}: only byte-level BPE tokenizer.json files are supported; pass input_ids instead");
        if (o["normalizer"] is JsonObject n && n["type"]?.GetValue<string>() is { } nt && nt != "NFC")
            throw new NotSupportedException($"{source}: normalizer '{nt}' is not supported; pass input_ids instead");

        var vocab = model["vocab"]!.AsObject().Select(kv => new KeyValuePair<string, int>(kv.Key, kv.Value!.GetValue<int>())).ToList();
        var merges = (model["merges"]?.AsArray() ?? []).Select(m => m is JsonArray pair
            ? $"{pair[0]!.GetValue<string>()} {pair[1]!.GetValue<string>()}" : m!.GetValue<string>()).ToList();
        var special = (o["added_tokens"]?.AsArray() ?? []).ToDictionary(t => t!["content"]!.GetValue<string>(), t => t!["id"]!.GetValue<int>());
        var split = Find(o["pre_tokenizer"], "Split")?["pattern"]?["Regex"]?.GetValue<string>()
            ?? @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
        var options = new BpeOptions(vocab)
        {
            Merges = merges,
            ByteLevel = true,
            SpecialTokens = special,
            PreTokenizer = new RegexPreTokenizer(new Regex(split, RegexOptions.Compiled), special),
        };
        int? bos = null;
        if (o["post_processor"] is JsonNode pp && Find(pp, "TemplateProcessing") is JsonObject tp
            && tp["single"]?.AsArray() is { Count: > 0 } single && single[0]?["SpecialToken"]?["id"]?.GetValue<string>() is { } bosToken
            && special.TryGetValue(bosToken, out var bosId))
            bos = bosId;
        return new HfTokenizer(BpeTokenizer.Create(options), bos);
    }

    public long[] Encode(string text)
    {
        var ids = _tokenizer.EncodeToIds(text).Select(i => (long)i);
        return (_bos is { } b ? ids.Prepend(b) : ids).ToArray();
    }

    static JsonObject? Find(JsonNode? node, string type)
    {
        if (node is not JsonObject o) return null;
        if (o["type"]?.GetValue<string>() == type) return o;
        foreach (var key in new[] { "pretokenizers", "processors" })
            if (o[key] is JsonArray a)
                foreach (var x in a) if (Find(x, type) is { } f) return f;
        return null;
    }
}
