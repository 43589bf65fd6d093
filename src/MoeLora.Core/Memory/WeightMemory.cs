using MoeLora.Core.Analysis;
using MoeLora.Core.Architectures;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Memory;

/// <summary>Bytes of the frozen base weights, by dtype and bitsandbytes quantisation.</summary>
public static class WeightMemory
{
    /// <summary>bitsandbytes 4-bit block size (<c>quantize_4bit(blocksize=64)</c>, transformers' default).</summary>
    public const int Nf4BlockSize = 64;

    /// <summary>Second-level block size of double quantisation (<c>quantize_blockwise(absmax, blocksize=256)</c>).</summary>
    public const int Nf4NestedBlockSize = 256;

    /// <summary>
    /// One NF4 weight of <paramref name="n"/> elements as bitsandbytes stores it (<c>functional.quantize_4bit</c>):
    /// packed data <c>ceil(n/2)</c> bytes (two 4-bit codes per uint8); one absmax per 64-element block, fp32
    /// (4 B/block) or, with double quantisation (<c>compress_statistics=True</c>), uint8 (1 B/block) plus the nested
    /// state: one fp32 absmax per 256 blocks, its 256-entry fp32 code book (1 KiB) and an fp32 offset; and the
    /// 16-entry fp32 NF4 code book (64 B).
    /// </summary>
    public static long Nf4Bytes(long n, bool doubleQuant)
    {
        var packed = (n + 1) / 2;
        var blocks = (n + Nf4BlockSize - 1) / Nf4BlockSize;
        var state = doubleQuant
            ? blocks + (blocks + Nf4NestedBlockSize - 1) / Nf4NestedBlockSize * 4 + 256 * 4 + 4
            : blocks * 4;
        return packed + state + 16 * 4;
    }

    /// <summary>LLM.int8 (<c>Int8Params</c>): int8 data (1 B/element) plus <c>SCB</c>, one fp32 scale per output row.</summary>
    public static long Int8Bytes(long outFeatures, long inFeatures) => outFeatures * inFeatures + outFeatures * 4;

    /// <summary>Whether transformers' bitsandbytes integration replaces this module: every nn.Linear except the output
    /// embedding (<c>lm_head</c> is in <c>modules_to_not_convert</c>). Embeddings, norms, routers that are not
    /// nn.Linear and fused 3-D expert parameters stay in the compute dtype (bitsandbytes has no 3-D layer).</summary>
    public static bool IsQuantized(ModelSpec spec, ModuleNode m) =>
        m.Kind == ModuleKind.Linear && m.Location != ModuleLocation.LmHead && m.Name != spec.OutputEmbeddings;

    /// <summary>The base weight bytes split into (quantised data, quantisation state, unquantised parameters).</summary>
    /// <param name="keepLayers">Decoder blocks loaded (circuit-breaker truncation); null loads all.</param>
    public static (long Quantized, long QuantState, long Plain) Bytes(ModelSpec spec, DType dtype, Quantization q, bool doubleQuant = true, long? keepLayers = null) =>
        Cache.GetOrCreateValue(spec).GetOrAdd((dtype, q, doubleQuant, keepLayers), k => Compute(spec, k.Item1, k.Item2, k.Item3, k.Item4));

    // Re-estimating one model under other settings must not walk the whole tree again.
    private static readonly System.Runtime.CompilerServices.ConditionalWeakTable<ModelSpec,
        System.Collections.Concurrent.ConcurrentDictionary<(DType, Quantization, bool, long?), (long, long, long)>> Cache = new();

    private static (long Quantized, long QuantState, long Plain) Compute(ModelSpec spec, DType dtype, Quantization q, bool doubleQuant, long? keepLayers)
    {
        long quantized = 0, state = 0, plain = 0;
        var a = dtype.Bytes();
        var prefix = spec.DecoderLayersPath + ".";
        foreach (var m in spec.Tree.Modules)
        {
            if (keepLayers is not null && m.LayerIndex >= keepLayers && m.Name.StartsWith(prefix, StringComparison.Ordinal)) continue;
            foreach (var p in m.Parameters)
            {
                if (p.IsTied) continue;
                if (q != Quantization.None && p.LocalName == "weight" && p.Shape.Length == 2 && IsQuantized(spec, m))
                {
                    var n = p.NumElements;
                    if (q == Quantization.Int8)
                    {
                        quantized += n;
                        state += p.Shape[0] * 4;
                    }
                    else
                    {
                        var total = Nf4Bytes(n, doubleQuant);
                        quantized += (n + 1) / 2;
                        state += total - (n + 1) / 2;
                    }
                }
                else
                {
                    plain += p.NumElements * a;
                }
            }
        }
        return (quantized, state, plain);
    }

    /// <summary>Parameters of the largest decoder layer (what ZeRO-3/FSDP gathers at once), in elements.</summary>
    public static long LargestLayerParameters(ModelSpec spec, bool excludeRoutedExperts = false) =>
        LayerSums.GetValue(spec, s => new Lazy<(long, long)>(() => (ComputeLargest(s, false), ComputeLargest(s, true))))
            .Value is var (all, noExperts) ? (excludeRoutedExperts ? noExperts : all) : 0;

    // The fit search estimates one model under many GPU counts; the per-layer sums depend only on the tree.
    private static readonly System.Runtime.CompilerServices.ConditionalWeakTable<ModelSpec, Lazy<(long, long)>> LayerSums = new();

    // One pass summing into a per-layer table (grouping every parameter through LINQ allocated about 0.7 MB for
    // DeepSeek-V3, a cost every cold `report` that searches sharded fixes paid).
    private static long ComputeLargest(ModelSpec spec, bool excludeRoutedExperts)
    {
        var perLayer = new Dictionary<int, long>();
        foreach (var m in spec.Tree.Modules)
        {
            if (m.LayerIndex is not { } layer || m.Location is ModuleLocation.Vision or ModuleLocation.Projector) continue;
            if (excludeRoutedExperts && m.Location == ModuleLocation.RoutedExpert) continue;
            long sum = 0;
            var any = false;
            foreach (var p in m.Parameters)
            {
                if (p.IsTied) continue;
                sum += p.NumElements;
                any = true;
            }
            if (any) perLayer[layer] = perLayer.GetValueOrDefault(layer) + sum;
        }
        return perLayer.Count == 0 ? 0 : perLayer.Values.Max();
    }

    /// <summary>Parameters of routed experts (what expert parallelism splits over GPUs), in elements.</summary>
    public static long RoutedExpertParameters(ModelSpec spec) =>
        spec.Tree.Modules.Where(m => m.Location == ModuleLocation.RoutedExpert).SelectMany(m => m.Parameters.Where(p => !p.IsTied)).Sum(p => p.NumElements);
}
