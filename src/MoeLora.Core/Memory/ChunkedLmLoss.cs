using MoeLora.Core.Modules;
using MoeLora.Core.Peft;

namespace MoeLora.Core.Memory;

/// <summary>
/// MoeLora's causal-LM loss when the LM head is frozen: the head's matmul and the cross-entropy run together a chunk of
/// tokens at a time, forward and again in backward, so the [tokens, vocab] logits never exist whole.
/// <para>
/// transformers' <c>ForCausalLMLoss</c> keeps the bf16 logits, their fp32 copy and the fp32 log-softmax for backward,
/// then allocates two more fp32 [tokens, vocab] gradients: 1.7 GiB for 1,024 tokens of Qwen3's 151,936-word
/// vocabulary, more than every LoRA gradient of a layer. The chunked loss computes the same values per row (each row's
/// log-softmax and gradient depend on that row alone), so only the mean's summation order differs.
/// </para>
/// The runtime (MoeLora.Torch's <c>LinearCrossEntropy</c>) and the planner both take their sizes from here.
/// </summary>
public static class ChunkedLmLoss
{
    /// <summary>The fp32 logits of one chunk stay within this many bytes.</summary>
    public const long ChunkLogitBytes = 64L << 20;

    /// <summary>Tokens per chunk for a vocabulary of <paramref name="vocab"/> words (at least one).</summary>
    public static long ChunkTokens(long vocab) => Math.Max(1, ChunkLogitBytes / (4 * Math.Max(1, vocab)));

    /// <summary>
    /// Peak bytes of the loss while one chunk of <c>c = min(tokens, ChunkTokens)</c> rows is live: two fp32 [c, V]
    /// tensors at once (the head's output widened and its log-softmax, which backward turns in place into the gradient;
    /// each narrower tensor is freed as soon as its wider copy exists), plus the gradient of the head's input for every
    /// token (a·tokens·H).
    /// </summary>
    public static long PeakBytes(long tokens, long vocab, long hidden, long dtypeBytes) =>
        8 * Math.Min(tokens, ChunkTokens(vocab)) * vocab + dtypeBytes * tokens * hidden;

    /// <summary>
    /// Whether the runtime takes the chunked path: the LM head is neither adapted nor trained (no LoRA on it, no
    /// modules_to_save copy, and no trainable embedding it is tied to). Otherwise its weight needs the whole logits'
    /// gradient and the loss runs as transformers' does.
    /// </summary>
    public static bool Applies(AdapterPlan plan)
    {
        var spec = plan.Spec;
        if (plan.Targets.Any(t => t.Location == ModuleLocation.LmHead || t.ModuleName == spec.OutputEmbeddings)) return false;
        return !plan.Extras.Any(e => Under(e.RuntimeName, spec.OutputEmbeddings) || (spec.TieWordEmbeddings && Under(e.RuntimeName, spec.InputEmbeddings)));
    }

    /// <summary>Whether a trainable tensor (named as PEFT's model names it, under <c>base_model.model.</c>) belongs to <paramref name="module"/>.</summary>
    static bool Under(string name, string module)
    {
        const string peftPrefix = "base_model.model.";
        if (name.StartsWith(peftPrefix, StringComparison.Ordinal)) name = name[peftPrefix.Length..];
        return name == module || name.StartsWith(module + ".", StringComparison.Ordinal);
    }
}
