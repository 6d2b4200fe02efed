using Microsoft.Win32.SafeHandles;

namespace Kvm.Storage;

/// <summary>Opens image files, turning every way an open can fail into an error that names the file.</summary>
internal static class ImageFile
{
    /// <summary>The HResult .NET gives an IOException for a lock held elsewhere (ERROR_SHARING_VIOLATION).</summary>
    private const int SharingViolation = unchecked((int)0x80070020);

    /// <summary>
    /// Opens an image file. A writable open with <paramref name="exclusive"/> takes an exclusive
    /// flock (FileShare.None); every other open takes a shared one, so an image open for
    /// exclusive writing cannot be opened again, and one open anywhere cannot be opened exclusively.
    /// </summary>
    public static SafeFileHandle Open(string path, FileAccess access, bool exclusive = false)
    {
        try
        {
            if (Directory.Exists(path))
                throw new ImageFormatException($"image {ImageText.Escape(path)}: is a directory");
            var share = exclusive && access != FileAccess.Read ? FileShare.None : FileShare.Read;
            return File.OpenHandle(path, FileMode.Open, access, share);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            throw new ImageFormatException($"image {ImageText.Escape(path)}: no such file");
        }
        catch (UnauthorizedAccessException)
        {
            throw new ImageFormatException($"image {ImageText.Escape(path)}: permission denied ({(access == FileAccess.Read ? "reading" : "reading and writing")})");
        }
        catch (PathTooLongException)
        {
            throw new ImageFormatException($"image {ImageText.Escape(path)}: the path is too long");
        }
        catch (IOException e) when (e.HResult == SharingViolation || e.Message.Contains("being used by another process", StringComparison.Ordinal))
        {
            throw new ImageFormatException(exclusive && access != FileAccess.Read
                ? $"image {ImageText.Escape(path)}: in use (another VM or program has it open; it is locked)"
                : $"image {ImageText.Escape(path)}: in use for writing by another VM or program (it is locked)", e);
        }
        catch (IOException e)
        {
            throw new ImageFormatException($"image {ImageText.Escape(path)}: cannot open: {e.Message}", e);
        }
    }
}
