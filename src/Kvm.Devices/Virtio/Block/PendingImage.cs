using Kvm.Storage;

namespace Kvm.Devices.Virtio.Block;

/// <summary>
/// The image of a <see cref="VirtioBlock"/> that is built before its image can be opened: a VM
/// being handed over is built by the new process while the old one still holds the image. Only
/// its path and read-only flag are known; <see cref="VirtioBlock.ReplaceImage"/> puts the real
/// image in place before the device serves anything. Flushing does nothing (nothing was written);
/// everything else is refused.
/// </summary>
public sealed class PendingImage(string path, bool readOnly) : IBlockImage
{
    public string Path => path;
    public bool ReadOnly => readOnly;
    public IBlockImage? Backing => null;
    public ulong Size => throw NotYet();

    public void Read(ulong offset, Span<byte> destination) => throw NotYet();
    public void Write(ulong offset, ReadOnlySpan<byte> source) => throw NotYet();
    public void WriteZeroes(ulong offset, ulong length) => throw NotYet();
    public void Discard(ulong offset, ulong length) => throw NotYet();
    public void Flush() { }
    public IReadOnlyList<Extent> GetAllocation(ulong offset, ulong length) => throw NotYet();
    public void Dispose() { }

    private InvalidOperationException NotYet() => new($"disk image {path} is not open yet (the device was built before it)");
}
