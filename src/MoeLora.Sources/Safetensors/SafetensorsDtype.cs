namespace MoeLora.Sources.Safetensors;

/// <summary>
/// Every element type the safetensors format defines (the <c>Dtype</c> enum of the reference implementation),
/// including the sub-byte micro-scaling types. Names are the exact header codes.
/// </summary>
public enum SafetensorsDtype
{
    BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, F8_E4M3FNUZ, F8_E5M2FNUZ,
    I16, U16, F16, BF16, I32, U32, F32, C64, F64, I64, U64,
}

/// <summary>Sizes and names of <see cref="SafetensorsDtype"/> values.</summary>
public static class SafetensorsDtypes
{
    /// <summary>Bits per element. Sizes are in bits because F4 and F6 pack several elements per byte.</summary>
    public static int Bits(this SafetensorsDtype dtype) => dtype switch
    {
        SafetensorsDtype.F4 => 4,
        SafetensorsDtype.F6_E2M3 or SafetensorsDtype.F6_E3M2 => 6,
        SafetensorsDtype.BOOL or SafetensorsDtype.U8 or SafetensorsDtype.I8 or SafetensorsDtype.F8_E5M2
            or SafetensorsDtype.F8_E4M3 or SafetensorsDtype.F8_E8M0 or SafetensorsDtype.F8_E4M3FNUZ
            or SafetensorsDtype.F8_E5M2FNUZ => 8,
        SafetensorsDtype.I16 or SafetensorsDtype.U16 or SafetensorsDtype.F16 or SafetensorsDtype.BF16 => 16,
        SafetensorsDtype.I32 or SafetensorsDtype.U32 or SafetensorsDtype.F32 => 32,
        SafetensorsDtype.C64 or SafetensorsDtype.F64 or SafetensorsDtype.I64 or SafetensorsDtype.U64 => 64,
        _ => throw new ArgumentOutOfRangeException(nameof(dtype), dtype, null),
    };

    /// <summary>The header code, e.g. <c>BF16</c>.</summary>
    public static string Code(this SafetensorsDtype dtype) => dtype.ToString();

    /// <summary>Parses a header code; codes are case-sensitive in the format.</summary>
    public static bool TryParse(string code, out SafetensorsDtype dtype)
    {
        // Enum.TryParse would also accept numbers and other casings, which the format does not.
        foreach (SafetensorsDtype candidate in Enum.GetValues<SafetensorsDtype>())
        {
            if (string.Equals(candidate.ToString(), code, StringComparison.Ordinal))
            {
                dtype = candidate;
                return true;
            }
        }
        dtype = default;
        return false;
    }
}
