using TorchSharp;
using static TorchSharp.torch;

namespace MoeLora.Torch.Nn;

/// <summary>
/// Causal, unmasked <c>torch.scaled_dot_product_attention</c> with its <c>scale</c> and <c>enable_gqa</c> arguments,
/// which TorchSharp 0.107 does not bind, through a TorchScript unit (as <see cref="GroupedMm"/>).
/// <para>
/// Why: without <c>enable_gqa</c> the kv heads must be repeated to the query heads first, two copies per layer
/// (for Qwen3-30B-A3B 8 MiB each per 1,024 tokens) that the flash kernel then keeps for backward, plus the ops that
/// make them and their backward; with it the flash kernel reads each kv head for its query group. Without <c>scale</c>,
/// q had to be multiplied so that SDPA's 1/√d gave the layer's scaling (an extra rounding in bf16 where the two differ;
/// transformers passes <c>scale</c>). Only the causal path without a mask uses it: with a float mask CUDA runs the
/// memory-efficient kernel, which has no grouped-query support (torch would fall back to the math path).
/// </para>
/// </summary>
internal static class CausalSdpa
{
    static readonly Lazy<torch.jit.CompilationUnit?> Unit = Runtime.TorchScriptUnit.Lazy(
        "def sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:\n" +
        "    return torch.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)\n",
        "MOELORA_GQA_SDPA");

    /// <summary>Whether this libtorch takes the arguments (and <c>MOELORA_GQA_SDPA=0</c> does not turn it off).</summary>
    public static bool Available => !Off && Unit.Value is not null;

    /// <summary>True on this thread: attention repeats the kv heads instead (tests compare the two paths).</summary>
    [ThreadStatic] internal static bool Off;

    /// <summary>How many attentions ran here on this thread (tests check which path a forward took).</summary>
    [ThreadStatic] internal static long Calls;

    /// <summary>q [B, heads, S, d], k [B, kvHeads, S, d], v [B, kvHeads, S, dv] → [B, heads, S, dv], causal, softmax scaled by <paramref name="scale"/>.</summary>
    public static Tensor Run(Tensor q, Tensor k, Tensor v, double scale)
    {
        Calls++;
        // Held here: TorchSharp 0.107's invoke does not keep a Scalar it makes from a double alive (see AdamW).
        using var s = scale.ToScalar();
        return (Tensor)Unit.Value!.invoke("sdpa", q, k, v, s);
    }
}
