namespace MoeLora.Core.Util;

/// <summary>Element counts of tensor shapes.</summary>
public static class Shapes
{
    /// <summary>The product of the dimensions (1 for a scalar), as a plain loop: the analysis asks for it for every
    /// parameter and adapter tensor many times per run, and LINQ's Aggregate allocates an enumerator each time.</summary>
    public static long Product(long[] shape)
    {
        long n = 1;
        foreach (var d in shape) n *= d;
        return n;
    }
}
