using System.Diagnostics;
using Kvm.Hypervisor;
using Kvm.Vmm.Machine;
using Microsoft.Extensions.Logging;

namespace Kvm.Vmm.Snapshot;

/// <summary>The working set a save recorded: the guest pages touched during its window.</summary>
/// <param name="Ranges">The pages, as the fewest ascending disjoint ranges (the snapshot's WSET section).</param>
/// <param name="Pages">How many pages.</param>
/// <param name="Faults">First touches taken (a hugetlb page counts once for its 512 pages).</param>
/// <param name="Seconds">How long the VM ran with the trace on.</param>
public sealed record WorkingSet(IReadOnlyList<GuestPageRange> Ranges, ulong Pages, long Faults, double Seconds);

/// <summary>The guest RAM of a VM cannot be traced (see <see cref="TouchTracer"/>), or the trace failed part way.</summary>
public sealed class WorkingSetUnavailableException(string message, Exception? inner = null) : Exception(message, inner);

/// <summary>
/// Records the working set of a running VM: every guest page read or written (by its vCPUs, its
/// devices or the VMM) between <see cref="Start"/> and <see cref="Stop"/> (<see cref="TouchTracer"/>).
/// </summary>
public sealed class WorkingSetTracer : IDisposable
{
    private readonly TouchTracer _tracer;
    private readonly long _started = Stopwatch.GetTimestamp();
    private WorkingSet? _result;

    private WorkingSetTracer(TouchTracer tracer) => _tracer = tracer;

    /// <summary>
    /// Why <paramref name="vm"/>'s working set cannot be traced now for a reason of the VM itself
    /// (a lazy restore still loading its RAM through its own userfaultfd), or null.
    /// </summary>
    public static string? Refusal(VirtualMachine vm)
    {
        if (vm.MemoryLoader is { } loader && !loader.WaitDone(TimeSpan.Zero))
        {
            var s = loader.Stats;
            long loaded = s.BytesFirst + s.BytesOnTouch + s.BytesInBackground;
            return $"the working set cannot be traced while a lazy restore is still loading guest RAM ({GuestMemory.FormatSize((ulong)loaded)} " +
                   $"of {GuestMemory.FormatSize((ulong)s.BytesTotal)} in): wait until it is done, or save without a working set";
        }
        return null;
    }

    /// <summary>
    /// Starts tracing <paramref name="vm"/>'s guest RAM; best while the VM is paused, so that no
    /// touch races with the start. Refused (<see cref="WorkingSetUnavailableException"/>, naming
    /// why) when <see cref="Refusal"/> says so or the RAM cannot be traced on this host.
    /// </summary>
    public static WorkingSetTracer Start(VirtualMachine vm)
    {
        if (Refusal(vm) is { } why)
            throw new WorkingSetUnavailableException(why);
        try
        {
            return new WorkingSetTracer(TouchTracer.Start(vm.Memory));
        }
        catch (TouchTraceUnavailableException e)
        {
            throw new WorkingSetUnavailableException(e.Message, e);
        }
    }

    /// <summary>Ends the trace and returns the pages touched; a trace that failed part way is refused (<see cref="WorkingSetUnavailableException"/>).</summary>
    public WorkingSet Stop()
    {
        if (_result is { } done)
            return done;
        var trace = _tracer.Stop();
        double seconds = Stopwatch.GetElapsedTime(_started).TotalSeconds;
        if (trace.Error is { } error)
            throw new WorkingSetUnavailableException($"the working-set trace failed after {seconds:0.###} s: {error}");
        _result = new WorkingSet(GuestPageRange.FromPages(trace.GuestPages), (ulong)trace.GuestPages.Length,
            trace.MinorFaults + trace.MissingFaults, seconds);
        return _result;
    }

    public void Dispose() => _tracer.Dispose();
}

/// <summary>What <see cref="VmSnapshot.SaveWithWorkingSet"/> did.</summary>
/// <param name="Snapshot">The snapshot written (its state file's length as it is at the end).</param>
/// <param name="WorkingSet">The working set recorded in it, or null when none was.</param>
/// <param name="WorkingSetSkipped">Why none was recorded (the trace was unavailable or failed), or null.</param>
public sealed record WorkingSetSaveResult(SnapshotWriteResult Snapshot, WorkingSet? WorkingSet, string? WorkingSetSkipped);

internal static partial class SnapshotLog
{
    [LoggerMessage(EventId = 1405, Level = LogLevel.Information, Message = "save {Directory}: working set of {Pages} pages ({Size}) in {Ranges} ranges recorded over {Seconds:0.###} s")]
    public static partial void WorkingSetRecorded(ILogger logger, string directory, ulong pages, string size, int ranges, double seconds);

    [LoggerMessage(EventId = 1406, Level = LogLevel.Warning, Message = "save {Directory}: saved without a working set: {Reason}")]
    public static partial void WorkingSetSkipped(ILogger logger, string directory, string reason);
}
