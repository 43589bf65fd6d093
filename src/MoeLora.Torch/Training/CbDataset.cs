using MoeLora.Torch.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using TorchSharp;
using static TorchSharp.torch;
using MoeLora.Core;

namespace MoeLora.Torch.Training;

/// <summary>Sequence lengths of the reference (§5–6): CB request ≤512 left-padded + response ≤512 right-padded; retain 1024 left-padded.</summary>
public sealed record CbLengths(int Request = 512, int Response = 512, int Retain = 1024);

/// <summary>One tokenised example: ids and mask of equal length.</summary>
public sealed record Tokenised(long[] Ids, long[] Mask);

/// <summary>
/// The circuit-breaker training set (reference <c>CircuitBreakerDataset</c>): circuit-breaker examples (prompt + harmful
/// completion; request and response tokenised separately and concatenated, the loss mask covering both) and retain
/// examples (chat messages or prompt/response, plus an optional refusal set: prompts with refusals), each list
/// shuffled once with the seed; length = min(|retain|, |cb|). Micro-batch i takes pairs from a per-epoch permutation,
/// so batch contents depend only on (seed, i): a resumed run sees the same data.
/// </summary>
public sealed class CbDataset : ICbBatchSource
{
    public IReadOnlyList<Tokenised> Cb { get; }
    public IReadOnlyList<Tokenised> Retain { get; }
    public int BatchSize { get; }
    readonly long _seed;
    readonly Dictionary<long, int[]> _perms = [];

    public CbDataset(IReadOnlyList<Tokenised> cb, IReadOnlyList<Tokenised> retain, int batchSize, long seed)
    {
        if (cb.Count == 0) throw new UserInputException("the circuit-breaker set is empty.");
        if (retain.Count == 0) throw new UserInputException("the retain set is empty.");
        if (batchSize < 1) throw new UserInputException("--batch-size must be at least 1.");
        var rng = new Random((int)(seed & 0x7fffffff));
        Cb = Shuffle(cb, rng); Retain = Shuffle(retain, rng);
        BatchSize = batchSize; _seed = seed;
        if (Length < batchSize) throw new UserInputException($"--batch-size {batchSize} is larger than the data set ({Length} pairs = min(|cb| {cb.Count}, |retain| {retain.Count})).");
    }

    public int Length => Math.Min(Cb.Count, Retain.Count);
    public int BatchesPerEpoch => Length / BatchSize;

    static List<Tokenised> Shuffle(IReadOnlyList<Tokenised> list, Random rng)
    {
        var l = list.ToList();
        for (int i = l.Count - 1; i > 0; i--) { int j = rng.Next(i + 1); (l[i], l[j]) = (l[j], l[i]); }
        return l;
    }

    public (TokenBatch Cb, TokenBatch Retain) Get(long index)
    {
        long epoch = index / BatchesPerEpoch; int k = (int)(index % BatchesPerEpoch);
        if (!_perms.TryGetValue(epoch, out var perm))
        {
            var rng = new Random((int)((_seed * 1_000_003 + epoch) & 0x7fffffff));
            perm = Enumerable.Range(0, Length).ToArray();
            for (int i = perm.Length - 1; i > 0; i--) { int j = rng.Next(i + 1); (perm[i], perm[j]) = (perm[j], perm[i]); }
            _perms[epoch] = perm;
        }
        var rows = perm.Skip(k * BatchSize).Take(BatchSize).ToArray();
        return (Stack(rows.Select(r => Cb[r]).ToList()), Stack(rows.Select(r => Retain[r]).ToList()));
    }

    public static TokenBatch Stack(IReadOnlyList<Tokenised> rows)
    {
        long s = rows[0].Ids.Length;
        var ids = rows.SelectMany(r => r.Ids).ToArray();
        var mask = rows.SelectMany(r => r.Mask).ToArray();
        return new TokenBatch(tensor(ids, [rows.Count, s]), tensor(mask, [rows.Count, s]));
    }
}

/// <summary>Reads the JSONL files and tokenises them as the reference does.</summary>
public sealed class CbDataLoader(HfTokenizer tokenizer, ChatTemplate template, CbLengths lengths)
{
    int PadId => tokenizer.PadId ?? 0;

    /// <summary>Left- or right-pads (and right-truncates, HF's default truncation side) to <paramref name="length"/>.</summary>
    public Tokenised Pad(List<int> ids, int length, bool left)
    {
        if (ids.Count > length) ids = ids.Take(length).ToList();
        int pad = length - ids.Count;
        var outIds = new long[length]; var mask = new long[length];
        for (int i = 0; i < length; i++) outIds[i] = PadId;
        int off = left ? pad : 0;
        for (int i = 0; i < ids.Count; i++) { outIds[off + i] = ids[i]; mask[off + i] = 1; }
        return new Tokenised(outIds, mask);
    }

    /// <summary>CB example: request (template + prompt, with special tokens) left-padded, response (no special tokens) right-padded, concatenated.</summary>
    public Tokenised CircuitBreaker(string? prompt, string completion)
    {
        var req = Pad(tokenizer.Encode(prompt is null ? template.UserTag + template.AssistantTag : template.Request(prompt), true), lengths.Request, left: true);
        var resp = Pad(tokenizer.Encode(completion, false), lengths.Response, left: false);
        return new Tokenised([.. req.Ids, .. resp.Ids], [.. req.Mask, .. resp.Mask]);
    }

    /// <summary>Retain example from prompt/response: the one-shot string with the separator replaced by the template's sep, left-padded.</summary>
    public Tokenised RetainPair(string prompt, string response) =>
        Pad(tokenizer.Encode(template.Request(prompt) + template.Sep + response, true), lengths.Retain, left: true);

    public Tokenised RetainConversation(IEnumerable<(string Role, string Content)> messages) =>
        Pad(tokenizer.Encode(template.Conversation(messages), true), lengths.Retain, left: true);

    static IEnumerable<(int Line, JsonObject Row)> ReadJsonl(string path)
    {
        if (!File.Exists(path)) throw new FileNotFoundException($"{path} not found.");
        int n = 0;
        foreach (var line in File.ReadLines(path))
        {
            n++;
            if (string.IsNullOrWhiteSpace(line)) continue;
            JsonObject row;
            try { row = JsonNode.Parse(line) as JsonObject ?? throw new InvalidDataException($"{path}:{n}: not a JSON object."); }
            catch (JsonException e) { throw new InvalidDataException($"{path}:{n}: not valid JSON: {Core.Util.UserJson.Describe(e)}."); }
            yield return (n, row);
        }
    }

    static string? Str(JsonObject row, params string[] keys) =>
        keys.Select(k => row[k]).FirstOrDefault(v => v is JsonValue)?.GetValue<string>();

    /// <summary>Circuit-breaker JSONL: {"prompt": ..., "output"|"completion"|"response": ...}. With <paramref name="dropPromptProb"/> &gt; 0 a
    /// seeded share of examples keeps only the response (upstream's switch_select [0,1] for Llama 3 is 0.5).</summary>
    public List<Tokenised> LoadCircuitBreaker(string path, double dropPromptProb = 0, long seed = 0)
    {
        var rng = new Random((int)(seed & 0x7fffffff) ^ 0x5bd1e995);
        var list = new List<Tokenised>();
        foreach (var (n, row) in ReadJsonl(path))
        {
            var prompt = Str(row, "prompt", "instruction") ?? throw new InvalidDataException($"{path}:{n}: no \"prompt\".");
            var output = Str(row, "output", "completion", "response") ?? throw new InvalidDataException($"{path}:{n}: no \"output\" (the harmful completion).");
            bool drop = dropPromptProb > 0 && rng.NextDouble() < dropPromptProb;
            list.Add(CircuitBreaker(drop ? null : prompt, output));
        }
        return list;
    }

    /// <summary>Retain JSONL: {"messages": [{"role","content"}...]} or {"prompt", "response"|"output"|"completion"}.
    /// A refusal set uses the same reader ({"prompt", "refusal"|"response"|"llama3_output"}).</summary>
    public List<Tokenised> LoadRetain(string path, int repeat = 1)
    {
        var list = new List<Tokenised>();
        foreach (var (n, row) in ReadJsonl(path))
        {
            Tokenised t;
            if (row["messages"] is JsonArray msgs)
                t = RetainConversation(msgs.Select(m => (m!["role"]?.GetValue<string>() ?? throw new InvalidDataException($"{path}:{n}: a message has no role."),
                    m["content"]?.GetValue<string>() ?? "")));
            else
            {
                var prompt = Str(row, "prompt", "instruction") ?? throw new InvalidDataException($"{path}:{n}: needs \"messages\" or \"prompt\" + \"response\".");
                var resp = Str(row, "response", "output", "completion", "refusal", "llama3_output") ?? throw new InvalidDataException($"{path}:{n}: no \"response\".");
                t = RetainPair(prompt, resp);
            }
            for (int i = 0; i < repeat; i++) list.Add(t);
        }
        return list;
    }
}
