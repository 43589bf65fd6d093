using MoeLora.Core;
using MoeLora.Sources.Safetensors;

namespace MoeLora.Sources.Adapters;

/// <summary>
/// ΔW of every adapted weight, per expert, under one naming whatever the saved layout (<c>owner.e.gate_proj</c>,
/// <c>owner.e.up_proj</c>, <c>owner.e.down_proj</c> with the transformers-5 fused owner), so two layouts of one adapter
/// can be compared exactly. A fused gate_up ΔW is split into gate and up features as <paramref name="layout"/> orders them.
/// </summary>
public static class AdapterDelta
{
    public static SortedDictionary<string, double[,]> PerExpert(AdapterFolder folder, ExpertLayout layout)
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
                if (p.Parameter is null || experts == 1)
                {
                    var at = p.Parameter is null ? layout.Locate(p.Module) : null;
                    Add(result, at is { } w ? Key(w.Owner, w.Expert, w.Role) : p.Module, d);
                    continue;
                }
                if (layout.PeftDeltaTransposed(p.Module)) d = Transpose(d);
                if (p.Parameter == "gate_up_proj")
                {
                    long half = d.GetLength(0) / 2;
                    bool halves = layout.Order == GateUpOrder.Halves;
                    Add(result, Key(p.Module, e, ExpertRole.Gate), halves ? Slice(d, 0, half, 1) : Slice(d, 0, half, 2));
                    Add(result, Key(p.Module, e, ExpertRole.Up), halves ? Slice(d, half, half, 1) : Slice(d, 1, half, 2));
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

    private static double[,] Transpose(double[,] d)
    {
        var t = new double[d.GetLength(1), d.GetLength(0)];
        for (int i = 0; i < d.GetLength(0); i++) for (int j = 0; j < d.GetLength(1); j++) t[j, i] = d[i, j];
        return t;
    }

    private static string Key(string owner, int expert, ExpertRole role) => $"{owner}.{expert}.{role.ToString().ToLowerInvariant()}_proj";

    // Rows start, start + step, … (count of them).
    private static double[,] Slice(double[,] d, long start, long count, long step)
    {
        var s = new double[count, d.GetLength(1)];
        for (long o = 0; o < count; o++) for (int i = 0; i < d.GetLength(1); i++) s[o, i] = d[start + o * step, i];
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
