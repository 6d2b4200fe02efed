using System.Buffers.Binary;
using System.Text;

namespace Kvm.Storage.Qcow2;

// Changing the header: growing the image, and naming a different backing file.
public sealed partial class Qcow2Image
{
    /// <summary>
    /// Grows the guest-visible size. A larger L1 table is written first at the end of the file, then
    /// the header switches to it in one write (l1_size and l1_table_offset are adjacent), then the
    /// size field changes, then the old table is freed.
    /// </summary>
    public void Resize(ulong newSize)
    {
        CheckWritable();
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (newSize < _header.Size)
                throw new ArgumentException($"image {ImageText.Escape(Path)}: shrinking from {_header.Size} to {newSize} bytes is not supported");
            if (newSize == _header.Size)
                return;
            PrepareBitmapsForResize();
            ulong needed = Qcow2Header.L1EntriesFor(newSize, _clusterBits);
            if (needed * 8 > Qcow2Header.MaxL1Bytes)
                throw new ArgumentException($"image {ImageText.Escape(Path)}: {newSize} bytes needs an L1 table over {Qcow2Header.MaxL1Bytes >> 20} MiB");
            if (needed > _header.L1Size)
            {
                ulong clusters = (needed * 8 + ClusterMask) >> _clusterBits;
                ulong entries = clusters * (ulong)_clusterSize / 8; // use the whole clusters
                entries = Math.Min(entries, Qcow2Header.MaxL1Bytes / 8);
                var table = new ulong[entries];
                Array.Copy(_l1, table, _l1.Length);
                ulong at = AllocateClusters((int)clusters);
                WriteTable(at, table);
                Span<byte> fields = stackalloc byte[12];
                BinaryPrimitives.WriteUInt32BigEndian(fields, (uint)entries);
                BinaryPrimitives.WriteUInt64BigEndian(fields[4..], at);
                RandomAccess.Write(_file, fields, 36);
                ulong oldOffset = _header.L1TableOffset;
                ulong oldClusters = ((ulong)_header.L1Size * 8 + ClusterMask) >> _clusterBits;
                _header.L1Size = (uint)entries;
                _header.L1TableOffset = at;
                _l1 = table;
                for (ulong c = 0; c < oldClusters; c++)
                    AddRefcount((oldOffset >> _clusterBits) + c, -1);
            }
            Span<byte> size = stackalloc byte[8];
            BinaryPrimitives.WriteUInt64BigEndian(size, newSize);
            RandomAccess.Write(_file, size, 24);
            _header.Size = newSize;
            ResizeBitmaps();
        }
    }

    /// <summary>
    /// Names another backing file (or none) in the header, without touching data: the caller must
    /// make sure the guest-visible content stays right (see <see cref="ImageOperations.Rebase"/>).
    /// The header cluster is rewritten in one write; other header extensions are kept.
    /// </summary>
    public void SetBackingFile(string? backingFile, string? backingFormat)
    {
        CheckWritable();
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (backingFile is not null && Encoding.UTF8.GetByteCount(backingFile) > 1023)
                throw new ArgumentException($"backing file name '{backingFile}' is longer than 1023 bytes");
            // Re-read the header cluster so that fields this class does not track are kept.
            var raw = new byte[_clusterSize];
            RandomAccess.Read(_file, raw, 0);
            var header = Qcow2Header.Parse(raw, _fileLength, Path);
            header.BackingFile = backingFile;
            header.BackingFormat = backingFile is null ? null : backingFormat;
            header.BackingFileOffset = 0;
            header.BackingFileSize = 0;
            var bytes = header.Serialize();
            RandomAccess.Write(_file, bytes, 0);
            RandomAccess.FlushToDisk(_file);
            _header.BackingFile = header.BackingFile;
            _header.BackingFormat = header.BackingFormat;
        }
    }
}
