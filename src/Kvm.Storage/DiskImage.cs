using Kvm.Storage.Qcow2;
using Kvm.Storage.Raw;

namespace Kvm.Storage;

/// <summary>Opens disk images of any supported format, with their backing chains.</summary>
public static class DiskImage
{
    /// <summary>Reads the format from the file's first bytes: "qcow2" or "raw".</summary>
    public static string ProbeFormat(string path)
    {
        Span<byte> magic = stackalloc byte[4];
        using var f = ImageFile.Open(path, FileAccess.Read);
        int n = RandomAccess.Read(f, magic, 0);
        return n == 4 && Qcow2Header.U32(magic, 0) == Qcow2Header.Magic ? "qcow2" : "raw";
    }

    /// <summary>Opens an image, probing its format unless <paramref name="forceFormat"/> names it.</summary>
    public static IBlockImage Open(string path, ImageOpenOptions? options = null, string? forceFormat = null) =>
        Open(Path.GetFullPath(path), options ?? new ImageOpenOptions(), forceFormat, new List<string>());

    private static IBlockImage Open(string path, ImageOpenOptions options, string? format, List<string> chain)
    {
        if (chain.Contains(path))
            throw new ImageFormatException(ImageText.Escape($"image {chain[0]}: backing chain loops back to {path} ({string.Join(" -> ", chain)} -> {path})"));
        if (chain.Count > options.MaxChainDepth)
            throw new ImageFormatException($"image {ImageText.Escape(chain[0])}: backing chain is deeper than {options.MaxChainDepth} images");
        format ??= ProbeFormat(path);
        chain.Add(path);
        switch (format)
        {
            case "raw":
                // One open that names the file in every error and takes the lock the options ask for.
                return RawImage.FromHandle(path, ImageFile.Open(path, options.ReadOnly ? FileAccess.Read : FileAccess.ReadWrite, options.Exclusive), options.ReadOnly);
            case "qcow2":
                return Qcow2Image.OpenFile(path, options, header =>
                {
                    if (header.BackingFile is null)
                        return null;
                    string backing = ResolveBacking(path, header.BackingFile, options);
                    string? backingFormat = header.BackingFormat switch
                    {
                        null or "" => null,
                        "qcow2" or "raw" => header.BackingFormat,
                        var other => throw new ImageFormatException($"qcow2 image {ImageText.Escape(path)}: backing format '{ImageText.Escape(other)}' is not supported"),
                    };
                    try
                    {
                        return Open(backing, options with { ReadOnly = true, Exclusive = false }, backingFormat, chain);
                    }
                    catch (ImageFormatException e) when (!e.Message.Contains(ImageText.Escape(path), StringComparison.Ordinal))
                    {
                        throw new ImageFormatException($"image {ImageText.Escape(path)}: cannot open backing file {ImageText.Escape(header.BackingFile)}: {e.Message}", e);
                    }
                });
            default:
                throw new ImageFormatException($"image {ImageText.Escape(path)}: format '{format}' is not supported (qcow2 and raw are)");
        }
    }

    /// <summary>Resolves a backing file name against the image's folder, refusing escapes when told to.</summary>
    public static string ResolveBacking(string imagePath, string backingName, ImageOpenOptions options)
    {
        string folder = Path.GetDirectoryName(Path.GetFullPath(imagePath)) ?? "/";
        string resolved = Path.GetFullPath(Path.IsPathRooted(backingName) ? backingName : Path.Combine(folder, backingName));
        if (!options.AllowBackingOutsideFolder)
        {
            string prefix = folder.EndsWith('/') ? folder : folder + "/";
            if (!resolved.StartsWith(prefix, StringComparison.Ordinal))
                throw new ImageFormatException(
                    $"image {ImageText.Escape(imagePath)}: backing file '{ImageText.Escape(backingName)}' resolves to {ImageText.Escape(resolved)}, outside the image's folder {ImageText.Escape(folder)}");
        }
        return resolved;
    }
}
