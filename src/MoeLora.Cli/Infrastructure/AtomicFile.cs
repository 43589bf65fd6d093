using System.Text;

namespace MoeLora.Cli.Infrastructure;

/// <summary>
/// Writes a file so that readers see either the old content or the new one, never half of it: the content goes to a
/// temporary sibling that is renamed over the target. A failure names the user's file (never the temporary one) and
/// leaves nothing behind.
/// </summary>
public static class AtomicFile
{
    public static void WriteAllText(string path, string content) =>
        Write(path, temp => File.WriteAllText(temp, content, new UTF8Encoding(false)));

    /// <summary>Runs <paramref name="writeTemp"/> on a temporary path next to <paramref name="path"/>, then renames it into place.</summary>
    /// <param name="extension">Appended to the temporary name, for writers that choose the format by extension.</param>
    public static void Write(string path, Action<string> writeTemp, string extension = "")
    {
        var full = Path.GetFullPath(path);
        var dir = Path.GetDirectoryName(full)!;
        if (!Directory.Exists(dir)) throw new IOException($"cannot write {path}: folder {dir} does not exist");
        if (Directory.Exists(full)) throw new IOException($"cannot write {path}: it is a folder");
        var temp = Path.Combine(dir, $".{Path.GetFileName(full)}.{Environment.ProcessId}.tmp{extension}");
        try
        {
            writeTemp(temp);
            File.Move(temp, full, overwrite: true);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // The temporary file is ours, not the user's: name the file they asked for.
            throw new IOException($"cannot write {path}: {e.Message.Replace(temp, full, StringComparison.Ordinal)}", e);
        }
        finally
        {
            try { if (File.Exists(temp)) File.Delete(temp); }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException) { }
        }
    }
}
