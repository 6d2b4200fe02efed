namespace Kvm.Devices.Virtio.Net;

/// <summary>
/// What a virtio-net device has moved: frames and bytes each way (bytes of Ethernet frames, header
/// not counted), and frames dropped by cause. Received: filtered out by the guest's receive mode,
/// too long for a buffer of a driver without MRG_RXBUF, shorter than an Ethernet header, dropped
/// at a pause. Transmitted: a source MAC not the VM's, too long, malformed (too short, or an
/// offload not negotiated), refused by the backend. Each way: over the limit a firing
/// denial-of-service rule set (DosAction.Limit), counted among the drops.
/// </summary>
public sealed record VirtioNetStats(
    long RxPackets, long RxBytes, long RxFiltered, long RxTooLong, long RxErrors, long RxDroppedAtPause,
    long TxPackets, long TxBytes, long TxSpoofed, long TxTooLong, long TxMalformed, long TxBackendDropped,
    long ControlCommands, long ControlRefused, long RxDosLimited = 0, long TxDosLimited = 0)
{
    public long TxDropped => TxSpoofed + TxTooLong + TxMalformed + TxBackendDropped + TxDosLimited;
    public long RxDropped => RxFiltered + RxTooLong + RxErrors + RxDroppedAtPause + RxDosLimited;
}

/// <summary>The counters behind <see cref="VirtioNetStats"/>, bumped by every queue worker at once.</summary>
internal sealed class VirtioNetCounters
{
    private long _rxPackets, _rxBytes, _rxFiltered, _rxTooLong, _rxErrors, _rxPause;
    private long _txPackets, _txBytes, _txSpoofed, _txTooLong, _txMalformed, _txBackend, _control, _controlRefused;
    private long _rxDos, _txDos;

    public void Rx(int bytes)
    {
        Interlocked.Increment(ref _rxPackets);
        Interlocked.Add(ref _rxBytes, bytes);
    }

    public void Tx(int bytes)
    {
        Interlocked.Increment(ref _txPackets);
        Interlocked.Add(ref _txBytes, bytes);
    }

    public void RxFiltered() => Interlocked.Increment(ref _rxFiltered);
    public void RxTooLong() => Interlocked.Increment(ref _rxTooLong);
    public void RxErrors() => Interlocked.Increment(ref _rxErrors);
    public void RxDroppedAtPause() => Interlocked.Increment(ref _rxPause);
    public void TxSpoofed() => Interlocked.Increment(ref _txSpoofed);
    public void TxTooLong() => Interlocked.Increment(ref _txTooLong);
    public void TxMalformed() => Interlocked.Increment(ref _txMalformed);
    public void TxBackendDropped() => Interlocked.Increment(ref _txBackend);
    public void RxDosLimited() => Interlocked.Increment(ref _rxDos);
    public void TxDosLimited() => Interlocked.Increment(ref _txDos);

    public void Control(bool ok)
    {
        Interlocked.Increment(ref _control);
        if (!ok)
            Interlocked.Increment(ref _controlRefused);
    }

    public VirtioNetStats Snapshot() => new(
        Interlocked.Read(ref _rxPackets), Interlocked.Read(ref _rxBytes), Interlocked.Read(ref _rxFiltered),
        Interlocked.Read(ref _rxTooLong), Interlocked.Read(ref _rxErrors), Interlocked.Read(ref _rxPause),
        Interlocked.Read(ref _txPackets), Interlocked.Read(ref _txBytes), Interlocked.Read(ref _txSpoofed),
        Interlocked.Read(ref _txTooLong), Interlocked.Read(ref _txMalformed), Interlocked.Read(ref _txBackend),
        Interlocked.Read(ref _control), Interlocked.Read(ref _controlRefused),
        Interlocked.Read(ref _rxDos), Interlocked.Read(ref _txDos));
}
