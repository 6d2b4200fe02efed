using Microsoft.Win32.SafeHandles;

namespace Kvm.Storage;

/// <summary>Opens image files, turning every way an open can fail into an error that names the file.</summary>
internal static class ImageFile
{
    public static SafeFileHandle Open(string path, FileAccess access)
    {
        try
        {
            if (Directory.Exists(path))
                throw new ImageFormatException($"image {path}: is a directory");
            return File.OpenHandle(path, FileMode.Open, access, FileShare.Read);
        }
        catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
        {
            throw new ImageFormatException($"image {path}: no such file");
        }
        catch (UnauthorizedAccessException)
        {
            throw new ImageFormatException($"image {path}: permission denied ({(access == FileAccess.Read ? "reading" : "reading and writing")})");
        }
        catch (PathTooLongException)
        {
            throw new ImageFormatException($"image {path}: the path is too long");
        }
        catch (IOException e)
        {
            throw new ImageFormatException($"image {path}: cannot open: {e.Message}", e);
        }
    }
}
