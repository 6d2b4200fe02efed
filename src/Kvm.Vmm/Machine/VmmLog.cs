using Microsoft.Extensions.Logging;

namespace Kvm.Vmm.Machine;

/// <summary>Log events of the VM engine. Event ids are stable: 1000-1099.</summary>
internal static partial class VmmLog
{
    [LoggerMessage(EventId = 1000, Level = LogLevel.Information, Message = "VM created: {Memory} RAM, {Cpus} vCPU(s), kernel {Kernel}")]
    public static partial void VmCreated(ILogger logger, string memory, int cpus, string kernel);

    [LoggerMessage(EventId = 1001, Level = LogLevel.Information, Message = "VM running")]
    public static partial void VmRunning(ILogger logger);

    [LoggerMessage(EventId = 1002, Level = LogLevel.Information, Message = "VM stopped: {Reason}")]
    public static partial void VmStopped(ILogger logger, string reason);

    [LoggerMessage(EventId = 1003, Level = LogLevel.Warning, Message = "vCPU {Vcpu} did not stop within {Seconds} s")]
    public static partial void VcpuStuck(ILogger logger, uint vcpu, double seconds);

    [LoggerMessage(EventId = 1004, Level = LogLevel.Debug, Message = "host lacks {Capability}; continuing without it")]
    public static partial void CapabilityMissing(ILogger logger, string capability);

    [LoggerMessage(EventId = 1005, Level = LogLevel.Information, Message = "restored from {Directory} ({Memory}) {Milliseconds:0.#} ms after the process started: {Steps}")]
    public static partial void Restored(ILogger logger, string directory, string memory, double milliseconds, string steps);

    [LoggerMessage(EventId = 1006, Level = LogLevel.Warning, Message = "{Nic}: uplink {Uplink} {State} ({Reason}); traffic now on {Active}")]
    public static partial void TeamChanged(ILogger logger, string nic, string uplink, string state, string reason, string active);

    [LoggerMessage(EventId = 1007, Level = LogLevel.Warning, Message = "{Nic}: denial-of-service rule {State}: {Alarm}")]
    public static partial void TrafficAlarm(ILogger logger, string nic, string state, string alarm);
}
