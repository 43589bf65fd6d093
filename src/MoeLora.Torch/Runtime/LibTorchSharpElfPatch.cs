using System.Buffers.Binary;
using System.Text;

namespace MoeLora.Torch.Runtime;

/// <summary>
/// Makes TorchSharp 0.107.0's <c>libLibTorchSharp.so</c> loadable on glibc systems whose libstdc++ predates GCC 13
/// (Debian 12 ships GLIBCXX_3.4.30). The library asks for GLIBCXX_3.4.32 for one symbol only,
/// <c>std::ios_base_library_init()</c>, a bare <c>.globl</c> reference that GCC 13's &lt;iostream&gt; emits and that
/// nothing calls (no relocation uses it). Three in-place edits remove the requirement, file size unchanged:
/// rename the undefined symbol's .dynstr string to <c>sched_yield</c> (a harmless libc function), mark its
/// .gnu.version entry as unversioned, and flag the GLIBCXX_3.4.32 Vernaux entry weak.
/// </summary>
public static class LibTorchSharpElfPatch
{
    public const string IosInitSymbol = "_ZSt21ios_base_library_initv";
    public const string Replacement = "sched_yield";
    public const string MissingVersion = "GLIBCXX_3.4.32";
    const ushort VerFlagWeak = 0x2;
    const ushort VerNdxGlobal = 1;

    public enum Result { Patched, AlreadyPatched, NotNeeded }

    /// <summary>Patches <paramref name="elf"/> in place. Idempotent; throws on a malformed or unexpected file.</summary>
    public static Result Patch(byte[] elf)
    {
        var f = Sections.Read(elf);
        int symbols = 0, weakened = 0, alreadyWeak = 0;

        // 1+2: rename and unversion the undefined reference, located through .dynsym (never by raw search:
        // the same string also lives in .strtab, which the loader ignores).
        long count = f.DynSym.Size / 24;
        for (long i = 0; i < count; i++)
        {
            long sym = f.DynSym.Offset + i * 24;
            uint nameOff = BinaryPrimitives.ReadUInt32LittleEndian(elf.AsSpan((int)sym));
            long strAt = f.DynStr.Offset + nameOff;
            if (!StringAt(elf, strAt).Equals(IosInitSymbol, StringComparison.Ordinal)) continue;
            ushort shndx = BinaryPrimitives.ReadUInt16LittleEndian(elf.AsSpan((int)sym + 6));
            if (shndx != 0) throw new InvalidDataException($"{IosInitSymbol} is defined here, not imported; refusing to patch.");
            EnsureNoSharedTail(elf, f, nameOff, IosInitSymbol.Length);
            var bytes = new byte[IosInitSymbol.Length];
            Encoding.ASCII.GetBytes(Replacement).CopyTo(bytes, 0);
            bytes.CopyTo(elf, strAt);
            BinaryPrimitives.WriteUInt16LittleEndian(elf.AsSpan((int)(f.GnuVersion.Offset + 2 * i)), VerNdxGlobal);
            symbols++;
        }

        // 3: weaken the version requirement so the loader no longer rejects the library for lacking it.
        long vn = f.GnuVersionR.Offset;
        for (uint n = 0; n < f.GnuVersionR.Info; n++)
        {
            ushort cnt = BinaryPrimitives.ReadUInt16LittleEndian(elf.AsSpan((int)vn + 2));
            uint aux = BinaryPrimitives.ReadUInt32LittleEndian(elf.AsSpan((int)vn + 8));
            uint next = BinaryPrimitives.ReadUInt32LittleEndian(elf.AsSpan((int)vn + 12));
            long a = vn + aux;
            for (int k = 0; k < cnt; k++)
            {
                uint name = BinaryPrimitives.ReadUInt32LittleEndian(elf.AsSpan((int)a + 8));
                if (StringAt(elf, f.DynStr.Offset + name) == MissingVersion)
                {
                    var flags = BinaryPrimitives.ReadUInt16LittleEndian(elf.AsSpan((int)a + 4));
                    if ((flags & VerFlagWeak) != 0) alreadyWeak++;
                    else { BinaryPrimitives.WriteUInt16LittleEndian(elf.AsSpan((int)a + 4), (ushort)(flags | VerFlagWeak)); weakened++; }
                }
                uint anext = BinaryPrimitives.ReadUInt32LittleEndian(elf.AsSpan((int)a + 12));
                if (anext == 0) break;
                a += anext;
            }
            if (next == 0) break;
            vn += next;
        }

        if (symbols == 0 && weakened == 0) return alreadyWeak > 0 ? Result.AlreadyPatched : Result.NotNeeded;
        if (symbols > 1) throw new InvalidDataException($"Expected one {IosInitSymbol} import, found {symbols}.");
        return Result.Patched;
    }

    static string StringAt(byte[] elf, long at)
    {
        int end = Array.IndexOf(elf, (byte)0, (int)at);
        return Encoding.ASCII.GetString(elf, (int)at, end - (int)at);
    }

    // A linker may share string tails; renaming must not change any other name that points into the same bytes.
    static void EnsureNoSharedTail(byte[] elf, Sections f, uint start, int length)
    {
        long count = f.DynSym.Size / 24;
        for (long i = 0; i < count; i++)
        {
            uint off = BinaryPrimitives.ReadUInt32LittleEndian(elf.AsSpan((int)(f.DynSym.Offset + i * 24)));
            if (off > start && off < start + length)
                throw new InvalidDataException("Another dynamic symbol shares the string being renamed; refusing to patch.");
        }
    }

    readonly record struct Section(long Offset, long Size, uint Info);

    sealed record Sections(Section DynSym, Section DynStr, Section GnuVersion, Section GnuVersionR)
    {
        public static Sections Read(byte[] elf)
        {
            if (elf.Length < 64 || elf[0] != 0x7F || elf[1] != (byte)'E' || elf[2] != (byte)'L' || elf[3] != (byte)'F')
                throw new InvalidDataException("Not an ELF file.");
            if (elf[4] != 2 || elf[5] != 1) throw new InvalidDataException("Only little-endian ELF64 is supported.");
            long shoff = (long)BinaryPrimitives.ReadUInt64LittleEndian(elf.AsSpan(0x28));
            int shentsize = BinaryPrimitives.ReadUInt16LittleEndian(elf.AsSpan(0x3A));
            int shnum = BinaryPrimitives.ReadUInt16LittleEndian(elf.AsSpan(0x3C));
            int shstrndx = BinaryPrimitives.ReadUInt16LittleEndian(elf.AsSpan(0x3E));
            (uint name, uint type, long off, long size, uint info) Header(int i)
            {
                var s = elf.AsSpan((int)(shoff + (long)i * shentsize));
                return (BinaryPrimitives.ReadUInt32LittleEndian(s), BinaryPrimitives.ReadUInt32LittleEndian(s[4..]),
                    (long)BinaryPrimitives.ReadUInt64LittleEndian(s[24..]), (long)BinaryPrimitives.ReadUInt64LittleEndian(s[32..]),
                    BinaryPrimitives.ReadUInt32LittleEndian(s[44..]));
            }
            long shstr = Header(shstrndx).off;
            var found = new Dictionary<string, Section>();
            for (int i = 0; i < shnum; i++)
            {
                var h = Header(i);
                string name = StringAt(elf, shstr + h.name);
                bool typeOk = name switch
                {
                    ".dynsym" => h.type == 11,
                    ".dynstr" => h.type == 3,
                    ".gnu.version" => h.type == 0x6fffffff,
                    ".gnu.version_r" => h.type == 0x6ffffffe,
                    _ => false,
                };
                if (typeOk) found[name] = new Section(h.off, h.size, h.info);
            }
            Section Get(string n) => found.TryGetValue(n, out var s) ? s : throw new InvalidDataException($"ELF section {n} missing.");
            return new Sections(Get(".dynsym"), Get(".dynstr"), Get(".gnu.version"), Get(".gnu.version_r"));
        }
    }
}
