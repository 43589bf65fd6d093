using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using MoeLora.Core;
using MoeLora.Sources.Safetensors;

namespace MoeLora.Sources.Adapters;

/// <summary>One tensor of an adapter file with its raw little-endian bytes (re-layouts only move bytes).</summary>
public sealed record AdapterTensor(string Name, SafetensorsDtype Dtype, long[] Shape, byte[] Data)
{
    public int ElementSize => Dtype.Bits() / 8;
    public string ShapeText => "(" + string.Join(", ", Shape) + ")";
}

/// <summary>
/// A PEFT LoRA adapter folder: <c>adapter_config.json</c> and <c>adapter_model.safetensors</c>, as PEFT's
/// save_pretrained writes them. The header goes through the repository's one safetensors parser.
/// </summary>
public sealed class AdapterFolder
{
    public const string ConfigName = "adapter_config.json";
    public const string WeightsName = "adapter_model.safetensors";

    public AdapterFolder(JsonObject config, IReadOnlyList<AdapterTensor> tensors)
    {
        Config = config;
        Tensors = tensors;
    }

    public JsonObject Config { get; }
    public IReadOnlyList<AdapterTensor> Tensors { get; }

    public static AdapterFolder Read(string dir)
    {
        if (!Directory.Exists(dir))
            throw new UserInputException($"adapter folder {dir} does not exist.");
        string configPath = Path.Combine(dir, ConfigName);
        string weightsPath = Path.Combine(dir, WeightsName);
        if (!File.Exists(configPath))
            throw new UserInputException($"{dir} holds no {ConfigName}: not a PEFT adapter folder.");
        if (!File.Exists(weightsPath))
            throw new UserInputException($"{dir} holds no {WeightsName} (only the safetensors format is read).");
        var config = Core.Util.UserJson.ParseObject(File.ReadAllText(configPath), configPath);
        if (config["peft_type"] is JsonNode pt && pt.GetValueKind() == JsonValueKind.String && pt.GetValue<string>() != "LORA")
            throw new UserInputException($"{configPath}: peft_type is '{pt.GetValue<string>()}', only LORA adapters are read.");
        byte[] bytes = File.ReadAllBytes(weightsPath);
        if (bytes.Length < 8)
            throw new SafetensorsFormatException($"{weightsPath} is not a valid safetensors file: shorter than 8 bytes.");
        long headerLength = BinaryPrimitives.ReadInt64LittleEndian(bytes);
        if (headerLength < 0 || headerLength > SafetensorsHeader.MaxHeaderLength || 8 + headerLength > bytes.Length)
            throw new SafetensorsFormatException($"{weightsPath} is not a valid safetensors file: header length {headerLength} does not fit the file.");
        var header = SafetensorsHeaderParser.Parse(bytes.AsMemory(8, (int)headerLength), bytes.Length - 8 - headerLength, weightsPath);
        long dataStart = 8 + headerLength;
        var tensors = header.Tensors
            .Select(t => new AdapterTensor(t.Name, t.Dtype, t.Shape.ToArray(),
                bytes.AsSpan((int)(dataStart + t.DataBegin), (int)t.ByteCount).ToArray()))
            .OrderBy(t => t.Name, StringComparer.Ordinal)
            .ToList();
        foreach (var t in tensors)
            if (t.Dtype.Bits() % 8 != 0)
                throw new UserInputException($"{weightsPath}: tensor '{t.Name}' has sub-byte dtype {t.Dtype.Code()}; LoRA adapters are float tensors.");
        return new AdapterFolder(config, tensors);
    }

    /// <summary>Writes the folder atomically: everything goes to a temporary sibling that is renamed into place.</summary>
    public void Write(string dir)
    {
        string full = Path.GetFullPath(dir);
        if (Directory.Exists(full) && Directory.EnumerateFileSystemEntries(full).Any())
            throw new UserInputException($"-o {dir} is not empty; choose a new or empty folder.");
        string parent = Path.GetDirectoryName(full) ?? ".";
        Directory.CreateDirectory(parent);
        string temp = Path.Combine(parent, "." + Path.GetFileName(full) + ".tmp-" + Guid.NewGuid().ToString("N")[..8]);
        Directory.CreateDirectory(temp);
        try
        {
            File.WriteAllText(Path.Combine(temp, ConfigName), Config.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
            File.WriteAllBytes(Path.Combine(temp, WeightsName), Serialize(Tensors));
            if (Directory.Exists(full)) Directory.Delete(full);
            Directory.Move(temp, full);
        }
        catch
        {
            if (Directory.Exists(temp)) Directory.Delete(temp, recursive: true);
            throw;
        }
    }

    /// <summary>safetensors bytes: 8-byte header length, JSON header (space-padded to 8 bytes), data in name order.</summary>
    public static byte[] Serialize(IReadOnlyList<AdapterTensor> tensors)
    {
        var header = new JsonObject { ["__metadata__"] = new JsonObject { ["format"] = "pt" } };
        long offset = 0;
        var ordered = tensors.OrderBy(t => t.Name, StringComparer.Ordinal).ToList();
        foreach (var t in ordered)
        {
            header[t.Name] = new JsonObject
            {
                ["dtype"] = t.Dtype.Code(),
                ["shape"] = new JsonArray(t.Shape.Select(s => (JsonNode)JsonValue.Create(s)).ToArray()),
                ["data_offsets"] = new JsonArray(offset, offset + t.Data.Length),
            };
            offset += t.Data.Length;
        }
        byte[] json = Encoding.UTF8.GetBytes(header.ToJsonString());
        int padded = (json.Length + 7) / 8 * 8;
        using var ms = new MemoryStream();
        Span<byte> len = stackalloc byte[8];
        BinaryPrimitives.WriteInt64LittleEndian(len, padded);
        ms.Write(len);
        ms.Write(json);
        for (int i = json.Length; i < padded; i++) ms.WriteByte((byte)' ');
        foreach (var t in ordered) ms.Write(t.Data);
        return ms.ToArray();
    }
}
