using System.Text;
using Kvm.Tests.Shared;
using Kvm.Vmm.Exits;
using Kvm.Vmm.Machine;

namespace Kvm.IntegrationTests;

/// <summary>Collects a VM's serial output for assertions.</summary>
public sealed class SerialCapture
{
    private readonly object _lock = new();
    private readonly MemoryStream _bytes = new();

    public void Write(ReadOnlySpan<byte> data)
    {
        lock (_lock)
            _bytes.Write(data);
    }

    public string Text
    {
        get { lock (_lock) return Encoding.UTF8.GetString(_bytes.ToArray()); }
    }

    public string[] Lines => Text.Split('\n', StringSplitOptions.RemoveEmptyEntries);

    public bool WaitFor(string text, TimeSpan timeout) => SpinWait.SpinUntil(() => Text.Contains(text, StringComparison.Ordinal), timeout);
}

/// <summary>Runs the guest kit in-process on real /dev/kvm.</summary>
public static class GuestKitRunner
{
    public static VmSpec Spec(string cmdline, bool debugExit = true) => new()
    {
        Kernel = TestEnvironment.GuestKit,
        Cmdline = cmdline,
        DebugExit = debugExit,
    };

    public static (VmStopReason Reason, SerialCapture Serial) Run(VmSpec spec, TimeSpan? timeout = null)
    {
        var serial = new SerialCapture();
        using var vm = VirtualMachine.Create(spec, serial.Write);
        using var cancel = new CancellationTokenSource(timeout ?? TimeSpan.FromSeconds(60));
        var reason = vm.Run(cancel.Token);
        if (reason is HostStop)
            throw new TimeoutException($"guest '{spec.Cmdline}' did not finish; output so far:\n{serial.Text}");
        return (reason, serial);
    }

    public static void Require()
    {
        TestEnvironment.RequireKvm();
        TestEnvironment.RequireGuestKit();
    }
}
