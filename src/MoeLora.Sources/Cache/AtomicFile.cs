namespace MoeLora.Sources.Cache;

/// <summary>Writes that readers never see half-done: a temporary file in the same folder, then a rename.</summary>
internal static class AtomicFile
{
    public static void WriteAllText(string path, string contents)
    {
        string temporary = $"{path}.{Guid.NewGuid():N}.tmp";
        try
        {
            File.WriteAllText(temporary, contents);
            File.Move(temporary, path, overwrite: true);
        }
        finally
        {
            if (File.Exists(temporary)) File.Delete(temporary);
        }
    }
}
