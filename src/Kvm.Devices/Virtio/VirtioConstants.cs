namespace Kvm.Devices.Virtio;

/// <summary>Feature bits defined by the virtio 1.2 specification for every device type (chapter 6).</summary>
public static class VirtioFeature
{
    public const int RingIndirectDesc = 28;
    public const int RingEventIdx = 29;
    public const int Version1 = 32;
    public const int AccessPlatform = 33;
    public const int RingPacked = 34;

    public static ulong Bit(int feature) => 1UL << feature;
}

/// <summary>Bits of the device status field (virtio 1.2, 2.1).</summary>
public static class VirtioStatus
{
    public const byte Acknowledge = 1;
    public const byte Driver = 2;
    public const byte DriverOk = 4;
    public const byte FeaturesOk = 8;
    public const byte DeviceNeedsReset = 0x40;
    public const byte Failed = 0x80;
}

/// <summary>The guest broke the virtqueue protocol; the device stops using the queue until reset.</summary>
public sealed class VirtqueueException(string message) : Exception(message);
