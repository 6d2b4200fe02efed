using System.Globalization;

namespace Kvm.Tests.Shared;

/// <summary>
/// The CPU time the calling OS thread has used so far (user and system; /proc/thread-self/stat, in
/// clock ticks of 10 ms). For a fuzz's bound on one parse: wall-clock time includes the time the
/// thread waited for a CPU, which on a loaded machine is long (a snapshot parse of well under a
/// second took 7 s of wall clock in CI, 2026-12-04), while a parse that loops on a hostile count
/// burns CPU time. Call it from the thread that does the work, with no await in between.
/// </summary>
public static class ThreadCpuTime
{
    /// <summary>Linux reports utime and stime in USER_HZ ticks, 100 per second on every architecture this runs on.</summary>
    private const int TicksPerSecond = 100;

    public static TimeSpan Now
    {
        get
        {
            string stat = File.ReadAllText("/proc/thread-self/stat");
            // Fields after the command name (which may hold spaces, so after its closing parenthesis):
            // state is field 3, utime field 14, stime field 15.
            string[] fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
            long ticks = long.Parse(fields[11], CultureInfo.InvariantCulture) + long.Parse(fields[12], CultureInfo.InvariantCulture);
            return TimeSpan.FromSeconds((double)ticks / TicksPerSecond);
        }
    }
}
