namespace MoeLora.Core.Analysis;

/// <summary>Floating-point storage types the analysis sizes.</summary>
public enum DType
{
    Float32,
    BFloat16,
    Float16,
}

public static class DTypes
{
    public static int Bytes(this DType d) => d == DType.Float32 ? 4 : 2;

    public static string Name(this DType d) => d switch
    {
        DType.Float32 => "fp32",
        DType.BFloat16 => "bf16",
        _ => "fp16",
    };

    public static DType Parse(string text) => text.Trim().ToLowerInvariant() switch
    {
        "fp32" or "float32" or "f32" => DType.Float32,
        "bf16" or "bfloat16" => DType.BFloat16,
        "fp16" or "float16" or "f16" or "half" => DType.Float16,
        _ => throw new UserInputException($"unknown dtype '{text}': use fp32, bf16 or fp16"),
    };
}
