using Microsoft.Extensions.Logging;

namespace Kvm.Devices;

/// <summary>Log events of devices. Event ids are stable: 2000-2099.</summary>
internal static partial class DeviceLog
{
    [LoggerMessage(EventId = 2000, Level = LogLevel.Warning, Message = "{Device}: the driver broke the virtio protocol, device needs reset: {Problem}")]
    public static partial void NeedsReset(ILogger logger, string device, string problem);

    [LoggerMessage(EventId = 2001, Level = LogLevel.Warning, Message = "{Device}: I/O error on {Operation} at byte {Offset}: {Problem}")]
    public static partial void IoError(ILogger logger, string device, string operation, ulong offset, string problem);

    [LoggerMessage(EventId = 2002, Level = LogLevel.Debug, Message = "{Device}: driver status 0x{Status:x2}")]
    public static partial void StatusChanged(ILogger logger, string device, byte status);

    [LoggerMessage(EventId = 2003, Level = LogLevel.Warning, Message = "{Device}: cannot bind queue {Queue} notifications to an ioeventfd at 0x{Address:x}: {Problem}")]
    public static partial void IoEventFailed(ILogger logger, string device, int queue, ulong address, string problem);

    [LoggerMessage(EventId = 2004, Level = LogLevel.Error, Message = "{Device}: queue {Queue} worker failed")]
    public static partial void WorkerFailed(ILogger logger, string device, int queue, Exception exception);

    [LoggerMessage(EventId = 2005, Level = LogLevel.Warning, Message = "{Device}: cannot update its bandwidth group, keeping its rates: {Problem}")]
    public static partial void BandwidthGroupFailed(ILogger logger, string device, string problem);

    [LoggerMessage(EventId = 2006, Level = LogLevel.Warning, Message = "{Device}: bandwidth group {Group} holds slots that are no member's claim, left out of the sharing: {Problem}")]
    public static partial void BandwidthGroupMalformed(ILogger logger, string device, string group, string problem);
}
