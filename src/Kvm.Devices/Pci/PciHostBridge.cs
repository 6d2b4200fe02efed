namespace Kvm.Devices.Pci;

/// <summary>The host bridge at 00:00.0: an identity in configuration space and nothing else.</summary>
public sealed class PciHostBridge : PciFunction
{
    /// <summary>Intel's vendor ID with a host-bridge device ID that Linux treats as a plain bridge.</summary>
    public const ushort BridgeVendorId = 0x8086, BridgeDeviceId = 0x0d57;

    public PciHostBridge() : base(BridgeVendorId, BridgeDeviceId, classCode: 0x06_00_00, revision: 0)
    {
    }

    public override string Name => "host bridge";

    public override void ReadBar(int index, ulong offset, Span<byte> data) => data.Fill(0xff);

    public override void WriteBar(int index, ulong offset, ReadOnlySpan<byte> data) { }
}
