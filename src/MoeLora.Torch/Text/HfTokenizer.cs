using System.Text;
using System.Text.Json.Nodes;
using System.Text.RegularExpressions;
using MoeLora.Core;

namespace MoeLora.Torch.Text;

/// <summary>
/// The one reader of Hugging Face <c>tokenizer.json</c> files (training data, <c>hidden-states --prompts</c>,
/// <c>routers</c>), for the BPE tokenizers of the supported families: byte-level BPE (Llama 3, Llama 4, Qwen, gpt-oss,
/// DeepSeek-V3: <c>Split</c> regex + <c>ByteLevel</c> pre-tokenizers) and SentencePiece-style BPE (Mistral/Mixtral:
/// <c>Prepend</c>/<c>Replace</c> normalizers or <c>Metaspace</c>, byte fallback).
/// Added tokens are matched first (longest first); <c>TemplateProcessing</c> post-processors add BOS/EOS;
/// <see cref="Decode"/> inverts the byte-level map (or Metaspace/byte fallback).
/// An <c>NFC</c> normalizer is accepted but not applied (the apps run with InvariantGlobalization, which has no Unicode
/// normalization): text must already be NFC, as nearly all text is. Not supported: WordPiece/Unigram models, <c>ignore_merges</c> shortcuts beyond a whole-word vocab hit, NFKC
/// normalizers, <c>Split</c> behaviours other than isolating the matches. Microsoft.ML.Tokenizers 2.0 has no reader
/// for this JSON format and its BPE cannot do SentencePiece-style byte fallback, which is why this reader exists.
/// </summary>
public sealed class HfTokenizer
{
    const string Gpt2Split = @"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
    readonly Dictionary<string, int> _vocab;
    readonly Dictionary<int, string> _tokens = [];
    readonly Dictionary<(string, string), int> _merges = [];
    readonly List<(string Content, int Id, bool Special)> _added;
    readonly HashSet<int> _specialIds;
    readonly Regex? _addedRegex;
    readonly Regex? _split;
    readonly bool _byteLevel, _byteFallback, _ignoreMerges, _addPrefixSpace;
    readonly List<(string Kind, string A, string B)> _normalizers = [];
    readonly string? _metaspace; readonly bool _metaspacePrepend;
    readonly int[] _prefix = [], _suffix = [];
    readonly Dictionary<string, int[]> _cache = [];
    readonly string? _unk;
    static readonly string[] ByteToUnicode = BuildByteMap();
    static readonly Dictionary<char, byte> UnicodeToByte = Enumerable.Range(0, 256).ToDictionary(b => ByteToUnicode[b][0], b => (byte)b);

    public int VocabSize { get; }
    public int? PadId { get; }
    public string? BosToken { get; }

    public HfTokenizer(string json, string source = "tokenizer.json")
    {
        var o = JsonNode.Parse(json)?.AsObject() ?? throw new UserInputException($"{source}: empty");
        var model = o["model"]?.AsObject() ?? throw new UserInputException($"{source}: no model");
        if ((model["type"]?.GetValue<string>() ?? "BPE") != "BPE")
            throw new NotSupportedException($"{source}: tokenizer model type '{model["type"]}' is not supported (BPE only); pass input_ids instead.");
        _vocab = model["vocab"]!.AsObject().ToDictionary(kv => kv.Key, kv => kv.Value!.GetValue<int>());
        int rank = 0;
        foreach (var m in model["merges"]?.AsArray() ?? [])
        {
            var (a, b) = m is JsonArray pair ? (pair[0]!.GetValue<string>(), pair[1]!.GetValue<string>()) : Split2(m!.GetValue<string>());
            _merges.TryAdd((a, b), rank++);
        }
        _byteFallback = model["byte_fallback"]?.GetValue<bool>() ?? false;
        _ignoreMerges = model["ignore_merges"]?.GetValue<bool>() ?? false;
        _unk = model["unk_token"]?.GetValue<string>();
        _added = (o["added_tokens"]?.AsArray() ?? [])
            .Select(t => (t!["content"]!.GetValue<string>(), t["id"]!.GetValue<int>(), t["special"]?.GetValue<bool>() ?? false)).ToList();
        foreach (var (c, id, _) in _added) { _vocab.TryAdd(c, id); }
        foreach (var (tok, id) in _vocab) _tokens.TryAdd(id, tok);
        foreach (var (c, id, _) in _added) _tokens[id] = c;
        _specialIds = _added.Where(a => a.Special).Select(a => a.Id).ToHashSet();
        if (_added.Count > 0)
            _addedRegex = new Regex(string.Join("|", _added.Select(a => a.Content).OrderByDescending(c => c.Length).Select(Regex.Escape)));
        VocabSize = _vocab.Values.Max() + 1;

        void Normalizer(JsonNode? n)
        {
            if (n is null) return;
            switch (n["type"]?.GetValue<string>())
            {
                case "Sequence": foreach (var x in n["normalizers"]!.AsArray()) Normalizer(x); break;
                case "Prepend": _normalizers.Add(("prepend", n["prepend"]!.GetValue<string>(), "")); break;
                case "Replace": _normalizers.Add(("replace", n["pattern"]!["String"]!.GetValue<string>(), n["content"]!.GetValue<string>())); break;
                case "NFC": break; // accepted, not applied: InvariantGlobalization has no Unicode normalization; input is expected in NFC
                case var t: throw new NotSupportedException($"{source}: normalizer '{t}' is not supported; pass input_ids instead.");
            }
        }
        Normalizer(o["normalizer"]);
        Regex? split = null; bool byteLevel = false, prefixSpace = false; string? meta = null; bool metaPrepend = false;
        void Pre(JsonNode? n)
        {
            if (n is null) return;
            switch (n["type"]?.GetValue<string>())
            {
                case "Sequence": foreach (var x in n["pretokenizers"]!.AsArray()) Pre(x); break;
                case "Split": split = new Regex(n["pattern"]!["Regex"]?.GetValue<string>() ?? Regex.Escape(n["pattern"]!["String"]!.GetValue<string>())); break;
                case "ByteLevel":
                    byteLevel = true;
                    prefixSpace = n["add_prefix_space"]?.GetValue<bool>() ?? false;
                    if ((n["use_regex"]?.GetValue<bool>() ?? true) && split is null) split = new Regex(Gpt2Split);
                    break;
                case "Metaspace":
                    meta = n["replacement"]?.GetValue<string>() ?? "▁";
                    metaPrepend = (n["prepend_scheme"]?.GetValue<string>() ?? "always") != "never";
                    break;
                case "Digits" or "Punctuation": break;
                case var t: throw new NotSupportedException($"{source}: pre_tokenizer '{t}' is not supported; pass input_ids instead.");
            }
        }
        Pre(o["pre_tokenizer"]);
        _split = split; _addPrefixSpace = prefixSpace; _metaspace = meta; _metaspacePrepend = metaPrepend;
        _byteLevel = byteLevel || (o["decoder"]?["type"]?.GetValue<string>() == "ByteLevel");

        var pre = new List<int>(); var post = new List<int>();
        void Post(JsonNode? n)
        {
            if (n is null) return;
            if (n["type"]?.GetValue<string>() == "Sequence") { foreach (var x in n["processors"]!.AsArray()) Post(x); return; }
            if (n["type"]?.GetValue<string>() != "TemplateProcessing") return;
            bool seen = false;
            foreach (var item in n["single"]!.AsArray())
            {
                if (item!["Sequence"] is not null) { seen = true; continue; }
                var tok = item["SpecialToken"]!["id"]!.GetValue<string>();
                var ids = n["special_tokens"]![tok]!["ids"]!.AsArray().Select(x => x!.GetValue<int>());
                (seen ? post : pre).AddRange(ids);
            }
        }
        Post(o["post_processor"]);
        _prefix = [.. pre]; _suffix = [.. post];
        if (_prefix.Length > 0) BosToken = _tokens.GetValueOrDefault(_prefix[0]);
        foreach (var cand in new[] { "<|pad|>", "<pad>", "<|finetune_right_pad_id|>", "<|finetune_right_pad|>", "<|endoftext|>", "<|end_of_text|>", "</s>", "<unk>" })
            if (_vocab.TryGetValue(cand, out var id)) { PadId = id; break; }
    }

    /// <summary>
    /// Reads <c>tokenizer.json</c> from a model folder (or the file itself). Without one, the message says to pass
    /// token ids instead (<c>--inputs</c>, or JSONL lines with <c>input_ids</c>).
    /// </summary>
    public static HfTokenizer Load(string? modelDirOrFile)
    {
        var path = modelDirOrFile is null ? null
            : Directory.Exists(modelDirOrFile) ? Path.Combine(modelDirOrFile, "tokenizer.json") : modelDirOrFile;
        if (path is null || !File.Exists(path))
            throw new FileNotFoundException($"text needs the model's tokenizer.json{(path is null ? "" : $" ({path} not found)")}; pass token ids instead (--inputs FILE.safetensors, or JSONL lines with \"input_ids\")");
        var json = File.ReadAllText(path);
        try
        {
            return new HfTokenizer(json, path);
        }
        catch (Exception e) when (e is System.Text.Json.JsonException or InvalidOperationException or NullReferenceException
            or KeyNotFoundException or FormatException or IndexOutOfRangeException or ArgumentException)
        {
            // The file is the user's; a field of the wrong kind or a missing one surfaces as one of these from
            // System.Text.Json.Nodes. Say which file, in one line.
            throw new InvalidDataException(e is System.Text.Json.JsonException je
                ? $"{path} is not valid JSON: {Core.Util.UserJson.Describe(je)}"
                : $"{path} is not a tokenizer.json MoeLora can read ({e.Message.Split('\n')[0]})");
        }
    }

    static (string, string) Split2(string m) { int i = m.IndexOf(' ', 1); return (m[..i], m[(i + 1)..]); }

    public int TokenId(string token) => _vocab.TryGetValue(token, out var id) ? id : throw new KeyNotFoundException($"token '{token}' is not in the vocabulary.");

    /// <summary>Token ids of <paramref name="text"/>; with <paramref name="addSpecialTokens"/> the post-processor's BOS/EOS.</summary>
    public List<int> Encode(string text, bool addSpecialTokens = true)
    {
        var ids = new List<int>();
        if (addSpecialTokens) ids.AddRange(_prefix);
        int pos = 0;
        bool first = true;
        foreach (Match m in _addedRegex?.Matches(text) ?? (IEnumerable<Match>)[])
        {
            if (m.Index > pos) { EncodeSegment(text[pos..m.Index], ids, first); first = false; }
            ids.Add(_vocab[m.Value]); pos = m.Index + m.Length;
        }
        if (pos < text.Length) EncodeSegment(text[pos..], ids, first);
        if (addSpecialTokens) ids.AddRange(_suffix);
        return ids;
    }

    /// <summary><see cref="Encode"/> as int64 ids (model inputs).</summary>
    public long[] EncodeToLongs(string text, bool addSpecialTokens = true) => Encode(text, addSpecialTokens).Select(i => (long)i).ToArray();

    void EncodeSegment(string s, List<int> ids, bool first)
    {
        foreach (var (kind, a, b) in _normalizers)
            s = kind == "prepend" ? (first ? a + s : s) : s.Replace(a, b, StringComparison.Ordinal);
        if (_metaspace is not null)
        {
            s = s.Replace(" ", _metaspace, StringComparison.Ordinal);
            if (_metaspacePrepend && first && !s.StartsWith(_metaspace, StringComparison.Ordinal)) s = _metaspace + s;
        }
        if (_byteLevel && _addPrefixSpace && !s.StartsWith(' ')) s = " " + s;
        foreach (var w in Words(s))
        {
            var word = _byteLevel ? string.Concat(Encoding.UTF8.GetBytes(w).Select(x => ByteToUnicode[x])) : w;
            if (!_cache.TryGetValue(word, out var wi)) _cache[word] = wi = Bpe(word);
            ids.AddRange(wi);
        }
    }

    /// <summary>The pre-tokenizer's pieces: the Split regex's matches and, isolated, any text between them.</summary>
    IEnumerable<string> Words(string s)
    {
        if (_split is null) { if (s.Length > 0) yield return s; yield break; }
        int pos = 0;
        foreach (Match m in _split.Matches(s))
        {
            if (m.Length == 0) continue;
            if (m.Index > pos) yield return s[pos..m.Index];
            yield return m.Value;
            pos = m.Index + m.Length;
        }
        if (pos < s.Length) yield return s[pos..];
    }

    int[] Bpe(string word)
    {
        if (_ignoreMerges && _vocab.TryGetValue(word, out var whole)) return [whole];
        var syms = new List<string>();
        for (int i = 0; i < word.Length;) { int len = char.IsSurrogatePair(word, i) ? 2 : 1; syms.Add(word.Substring(i, len)); i += len; }
        while (syms.Count > 1)
        {
            int best = -1, bestRank = int.MaxValue;
            for (int i = 0; i < syms.Count - 1; i++)
                if (_merges.TryGetValue((syms[i], syms[i + 1]), out var r) && r < bestRank) { bestRank = r; best = i; }
            if (best < 0) break;
            syms[best] += syms[best + 1]; syms.RemoveAt(best + 1);
        }
        var ids = new List<int>();
        foreach (var sym in syms)
        {
            if (_vocab.TryGetValue(sym, out var id)) { ids.Add(id); continue; }
            if (_byteFallback) { foreach (var by in Encoding.UTF8.GetBytes(sym)) ids.Add(_vocab[$"<0x{by:X2}>"]); continue; }
            if (_unk is not null && _vocab.TryGetValue(_unk, out var u)) { ids.Add(u); continue; }
            throw new InvalidDataException($"tokenizer: '{sym}' is not in the vocabulary and there is no byte fallback or unk token.");
        }
        return [.. ids];
    }

    /// <summary>
    /// Text of <paramref name="ids"/>: added tokens verbatim (special ones dropped with <paramref name="skipSpecialTokens"/>),
    /// byte-level symbols mapped back to UTF-8 bytes, or for SentencePiece-style BPE <c>&lt;0xXX&gt;</c> byte tokens
    /// fused into UTF-8, the Metaspace symbol turned back into spaces and the prepended space removed.
    /// </summary>
    public string Decode(IEnumerable<int> ids, bool skipSpecialTokens = false)
    {
        var sb = new StringBuilder();
        var bytes = new List<byte>();
        bool atStart = true;
        void Flush()
        {
            if (bytes.Count == 0) return;
            var piece = Encoding.UTF8.GetString(bytes.ToArray());
            bytes.Clear();
            if (!_byteLevel)
            {
                if (_metaspace is not null) piece = piece.Replace(_metaspace, " ", StringComparison.Ordinal);
                foreach (var (kind, a, b) in _normalizers.Where(n => n.Kind == "replace")) piece = piece.Replace(b, a, StringComparison.Ordinal);
                if (atStart && piece.StartsWith(' ') && (_metaspacePrepend || _normalizers.Any(n => n.Kind == "prepend"))) piece = piece[1..];
            }
            atStart = false;
            sb.Append(piece);
        }
        foreach (var id in ids)
        {
            if (!_tokens.TryGetValue(id, out var tok)) throw new ArgumentOutOfRangeException(nameof(ids), $"token id {id} is not in the vocabulary.");
            if (_added.Any(a => a.Id == id))
            {
                if (skipSpecialTokens && _specialIds.Contains(id)) continue;
                Flush(); sb.Append(tok); continue;
            }
            if (_byteLevel) { foreach (var c in tok) if (UnicodeToByte.TryGetValue(c, out var by)) bytes.Add(by); else bytes.AddRange(Encoding.UTF8.GetBytes(c.ToString())); }
            else if (_byteFallback && tok.Length == 6 && tok.StartsWith("<0x", StringComparison.Ordinal) && tok.EndsWith('>'))
                bytes.Add(Convert.ToByte(tok[3..5], 16));
            else bytes.AddRange(Encoding.UTF8.GetBytes(tok));
        }
        Flush();
        return sb.ToString();
    }

    /// <summary>GPT-2's bytes_to_unicode table.</summary>
    static string[] BuildByteMap()
    {
        var bs = new List<int>();
        for (int i = '!'; i <= '~'; i++) bs.Add(i);
        for (int i = '¡'; i <= '¬'; i++) bs.Add(i);
        for (int i = '®'; i <= 'ÿ'; i++) bs.Add(i);
        var cs = new List<int>(bs); int n = 0;
        for (int b = 0; b < 256; b++) if (!bs.Contains(b)) { bs.Add(b); cs.Add(256 + n++); }
        var map = new string[256];
        for (int i = 0; i < bs.Count; i++) map[bs[i]] = char.ConvertFromUtf32(cs[i]);
        return map;
    }

    /// <summary>A byte-level tokenizer.json with the 256 byte symbols, no merges and the given special tokens (the tiny preset's).</summary>
    public static string ByteLevelJson(IReadOnlyList<string> specials, string? bos)
    {
        var vocab = new JsonObject();
        var map = BuildByteMap();
        for (int b = 0; b < 256; b++) vocab[map[b]] = b;
        var added = new JsonArray();
        for (int i = 0; i < specials.Count; i++)
            // The JsonNode overload: Add<T> would go through reflection serialization (not AOT-safe).
            // Every field of the tokenizers library's AddedToken: it refuses an entry without them ("missing field
            // `single_word`"), so transformers could not load the tiny preset's tokenizer otherwise.
            added.Add((JsonNode)new JsonObject
            {
                ["id"] = 256 + i, ["content"] = specials[i], ["single_word"] = false, ["lstrip"] = false, ["rstrip"] = false,
                ["normalized"] = false, ["special"] = true,
            });
        var o = new JsonObject
        {
            ["version"] = "1.0",
            ["truncation"] = null,
            ["padding"] = null,
            ["added_tokens"] = added,
            ["normalizer"] = null,
            ["pre_tokenizer"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = true, ["use_regex"] = true },
            ["post_processor"] = bos is null ? null : new JsonObject
            {
                ["type"] = "TemplateProcessing",
                ["single"] = new JsonArray(new JsonObject { ["SpecialToken"] = new JsonObject { ["id"] = bos, ["type_id"] = 0 } },
                    new JsonObject { ["Sequence"] = new JsonObject { ["id"] = "A", ["type_id"] = 0 } }),
                ["pair"] = new JsonArray(),
                ["special_tokens"] = new JsonObject { [bos] = new JsonObject { ["id"] = bos, ["ids"] = new JsonArray(256 + specials.ToList().IndexOf(bos)), ["tokens"] = new JsonArray(bos) } },
            },
            ["decoder"] = new JsonObject { ["type"] = "ByteLevel", ["add_prefix_space"] = false, ["trim_offsets"] = true, ["use_regex"] = true },
            ["model"] = new JsonObject
            {
                ["type"] = "BPE", ["dropout"] = null, ["unk_token"] = null, ["continuing_subword_prefix"] = null, ["end_of_word_suffix"] = null,
                ["fuse_unk"] = false, ["byte_fallback"] = false, ["ignore_merges"] = false, ["vocab"] = vocab, ["merges"] = new JsonArray(),
            },
        };
        return o.ToJsonString();
    }
}
