using System.Buffers.Binary;
using Kvm.Interop.Structs;

namespace Kvm.Vmm.Exits;

/// <summary>
/// A decoded exit, read from a kvm_run page. <see cref="Data"/> aliases the page, so an I/O read
/// handler fills the value KVM hands back to the guest.
/// </summary>
public readonly ref struct VcpuExit
{
    public KvmExitReason Reason { get; init; }

    // KVM_EXIT_IO
    public bool IsWrite { get; init; }
    public ushort Port { get; init; }
    public int Size { get; init; }
    public uint Count { get; init; }

    // KVM_EXIT_MMIO
    public ulong Address { get; init; }

    /// <summary>The I/O or MMIO data (Size × Count bytes for port I/O, Size bytes for MMIO).</summary>
    public Span<byte> Data { get; init; }

    // KVM_EXIT_INTERNAL_ERROR
    public uint Suberror { get; init; }
    public ulong[]? InternalData { get; init; }

    // KVM_EXIT_FAIL_ENTRY
    public ulong HardwareReason { get; init; }
    public uint FailCpu { get; init; }

    // KVM_EXIT_SYSTEM_EVENT
    public uint SystemEvent { get; init; }

    /// <summary>Set when the page describes an exit whose fields are inconsistent (never expected from KVM).</summary>
    public string? Malformed { get; init; }

    /// <summary>Decodes the exit in a kvm_run page, checking every offset and size against the page.</summary>
    public static VcpuExit Decode(Span<byte> run)
    {
        if (run.Length < KvmRunLayout.SyncRegs)
            return new VcpuExit { Reason = KvmExitReason.Unknown, Malformed = $"kvm_run page is only {run.Length} bytes" };
        var reason = (KvmExitReason)U32(run, KvmRunLayout.ExitReason);
        switch (reason)
        {
            case KvmExitReason.Io:
            {
                int size = run[KvmRunLayout.IoSize];
                uint count = U32(run, KvmRunLayout.IoCount);
                ulong offset = U64(run, KvmRunLayout.IoDataOffset);
                ulong bytes = (ulong)size * count;
                if (size is not (1 or 2 or 4) || count == 0 || offset > (ulong)run.Length || bytes > (ulong)run.Length - offset)
                    return new VcpuExit { Reason = reason, Malformed = $"port I/O exit with size {size}, count {count}, data offset {offset}" };
                return new VcpuExit
                {
                    Reason = reason,
                    IsWrite = run[KvmRunLayout.IoDirection] == KvmIoDirection.Out,
                    Port = BinaryPrimitives.ReadUInt16LittleEndian(run[KvmRunLayout.IoPort..]),
                    Size = size,
                    Count = count,
                    Data = run.Slice((int)offset, (int)bytes),
                };
            }
            case KvmExitReason.Mmio:
            {
                uint len = U32(run, KvmRunLayout.MmioLen);
                if (len is 0 or > 8)
                    return new VcpuExit { Reason = reason, Malformed = $"MMIO exit with length {len}" };
                return new VcpuExit
                {
                    Reason = reason,
                    Address = U64(run, KvmRunLayout.MmioPhysAddr),
                    IsWrite = run[KvmRunLayout.MmioIsWrite] != 0,
                    Size = (int)len,
                    Count = 1,
                    Data = run.Slice(KvmRunLayout.MmioData, (int)len),
                };
            }
            case KvmExitReason.InternalError:
            {
                uint n = Math.Min(U32(run, KvmRunLayout.InternalNdata), KvmRunLayout.InternalMaxData);
                var data = new ulong[n];
                for (int i = 0; i < n; i++)
                    data[i] = U64(run, KvmRunLayout.InternalData + i * 8);
                return new VcpuExit { Reason = reason, Suberror = U32(run, KvmRunLayout.InternalSuberror), InternalData = data };
            }
            case KvmExitReason.FailEntry:
                return new VcpuExit
                {
                    Reason = reason,
                    HardwareReason = U64(run, KvmRunLayout.FailEntryReason),
                    FailCpu = U32(run, KvmRunLayout.FailEntryCpu),
                };
            case KvmExitReason.SystemEvent:
                return new VcpuExit { Reason = reason, SystemEvent = U32(run, KvmRunLayout.SystemEventType) };
            default:
                return new VcpuExit { Reason = reason };
        }
    }

    private static uint U32(ReadOnlySpan<byte> b, int o) => BinaryPrimitives.ReadUInt32LittleEndian(b[o..]);
    private static ulong U64(ReadOnlySpan<byte> b, int o) => BinaryPrimitives.ReadUInt64LittleEndian(b[o..]);
}
