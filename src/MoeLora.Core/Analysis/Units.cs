using System.Globalization;

namespace MoeLora.Core.Analysis;

/// <summary>Human-readable numbers: binary byte units and thousands separators.</summary>
public static class Units
{
    public static string Bytes(long bytes)
    {
        string[] units = ["B", "KiB", "MiB", "GiB", "TiB"];
        double v = bytes;
        var i = 0;
        while (Math.Abs(v) >= 1024 && i < units.Length - 1)
        {
            v /= 1024;
            i++;
        }
        return i == 0 ? $"{bytes} B" : v.ToString("0.00", CultureInfo.InvariantCulture) + " " + units[i];
    }

    public static string Count(long n) => n.ToString("N0", CultureInfo.InvariantCulture);

    public static string Percent(double p) => p.ToString("0.0000", CultureInfo.InvariantCulture) + "%";
}
