using MoeLora.Core;
using MoeLora.Sources.Safetensors;

namespace MoeLora.Sources.Adapters;

/// <summary>
/// ΔW of every adapted weight, per expert, in the per-expert naming (<c>…experts.e.gate_proj</c> etc.) whatever the
/// saved layout, so two layouts of one adapter can be compared exactly. Fused gate_up ΔW rows are gate then up.
/// </summary>
public static class AdapterDelta
{
    public static SortedDictionary<string, double[,]> PerExpert(AdapterFolder folder)
    {
        var (pairs, _) = LoraPairs.Read(folder);
        bool rslora = LoraPairs.Bool(folder.Config, "use_rslora");
        var result = new SortedDictionary<string, double[,]>(StringComparer.Ordinal);
        foreach (var p in pairs)
        {
            double s = p.Scaling(rslora);
            double[] a = Floats(p.A), b = Floats(p.B);
            long aRows = p.A.Shape[0], inF = p.A.Shape[1], outF = p.B.Shape[0], bCols = p.B.Shape[1];
            int experts = p.Parameter is null ? 1 : p.Experts;
            for (int e = 0; e < experts; e++)
            {
                var d = new double[outF, inF];
                for (long o = 0; o < outF; o++)
                    for (long i = 0; i < inF; i++)
                    {
                        double sum = 0;
                        for (int k = 0; k < p.Rank && k < aRows; k++)
                        {
                            long col = experts == 1 ? k : (long)k * experts + e;
                            if (col >= bCols) break;
                            sum += b[o * bCols + col] * a[((long)e * p.Rank + k) * inF + i];
                        }
                        d[o, i] = sum * s;
                    }
                if (p.Parameter is null || experts == 1) { Add(result, p.Module, d); continue; }
                if (p.Parameter == "gate_up_proj")
                {
                    long half = outF / 2;
                    Add(result, $"{p.Module}.{e}.gate_proj", Slice(d, 0, half));
                    Add(result, $"{p.Module}.{e}.up_proj", Slice(d, half, half));
                }
                else Add(result, $"{p.Module}.{e}.{p.Parameter}", d);
            }
        }
        return result;
    }

    private static void Add(SortedDictionary<string, double[,]> r, string key, double[,] d)
    {
        if (!r.TryAdd(key, d)) throw new UserInputException($"adapter adapts {key} twice.");
    }

    private static double[,] Slice(double[,] d, long start, long count)
    {
        var s = new double[count, d.GetLength(1)];
        for (long o = 0; o < count; o++) for (int i = 0; i < d.GetLength(1); i++) s[o, i] = d[start + o, i];
        return s;
    }

    public static double[] Floats(AdapterTensor t)
    {
        int n = t.Data.Length / t.ElementSize;
        var r = new double[n];
        var span = t.Data.AsSpan();
        for (int i = 0; i < n; i++)
            r[i] = t.Dtype switch
            {
                SafetensorsDtype.F32 => BitConverter.ToSingle(span.Slice(i * 4, 4)),
                SafetensorsDtype.F64 => BitConverter.ToDouble(span.Slice(i * 8, 8)),
                SafetensorsDtype.F16 => (double)BitConverter.ToHalf(span.Slice(i * 2, 2)),
                SafetensorsDtype.BF16 => BitConverter.Int32BitsToSingle(BitConverter.ToUInt16(span.Slice(i * 2, 2)) << 16),
                _ => throw new UserInputException($"{t.Name}: dtype {t.Dtype.Code()} is not a float type a LoRA factor can have."),
            };
        return r;
    }
}
