namespace Kvm.Tests.Shared;

/// <summary>
/// Turns shmem transparent huge pages on ('advise') for a test that needs them, which guest RAM in a
/// memfd does for THP; Dispose puts the settings back. Needs root, and changes a machine-wide
/// setting for the test's duration: only tests that run in the nested KVM host (or on a machine
/// with a usable /dev/kvm, as the hugetlb tests do with nr_hugepages) use it. Test processes that
/// run side by side take turns (a lock file), so that one's restore does not end another's test.
/// </summary>
public sealed class ShmemThp : IDisposable
{
    private const string Top = "/sys/kernel/mm/transparent_hugepage/shmem_enabled";
    private const string PerSize = "/sys/kernel/mm/transparent_hugepage/hugepages-2048kB/shmem_enabled";
    private readonly List<(string File, string Value)> _saved = [];
    private readonly FileStream _lock;

    private ShmemThp(FileStream lockFile) => _lock = lockFile;

    /// <summary>An exclusive lock (flock, which .NET takes for FileShare.None) on a file all test processes here share.</summary>
    private static FileStream TakeTurn()
    {
        string path = Path.Combine(Path.GetTempPath(), "kvm-tests-shmem-thp.lock");
        var until = DateTime.UtcNow.AddMinutes(5);
        while (true)
        {
            try
            {
                return new FileStream(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None);
            }
            catch (IOException) when (DateTime.UtcNow < until)
            {
                Thread.Sleep(50);
            }
        }
    }

    /// <summary>Sets shmem_enabled to 'advise' (and the 2 MiB size's own setting to 'inherit' where it said 'never').</summary>
    public static ShmemThp Advise()
    {
        TestEnvironment.SkipIf(Environment.UserName != "root" ? $"needs root to turn shmem THP on through {Top}" : null);
        TestEnvironment.SkipIf(File.Exists(Top) ? null : $"{Top} is missing (no transparent huge pages)");
        var s = new ShmemThp(TakeTurn());
        try
        {
            s.Set(Top, "advise", keepIf: ["always", "within_size", "advise", "force"]);
            if (File.Exists(PerSize))
                s.Set(PerSize, "inherit", keepIf: ["always", "within_size", "advise", "inherit"]);
            return s;
        }
        catch
        {
            s.Dispose();
            throw;
        }
    }

    private void Set(string file, string value, string[] keepIf)
    {
        string now = Selected(file);
        if (keepIf.Contains(now))
            return;
        _saved.Add((file, now));
        File.WriteAllText(file, value);
    }

    /// <summary>The selected value of a sysfs choice file ("always [advise] never" gives "advise").</summary>
    public static string Selected(string file)
    {
        string s = File.ReadAllText(file);
        int a = s.IndexOf('['), b = s.IndexOf(']');
        return a >= 0 && b > a ? s[(a + 1)..b] : s.Trim();
    }

    public void Dispose()
    {
        for (int i = _saved.Count - 1; i >= 0; i--)
            File.WriteAllText(_saved[i].File, _saved[i].Value);
        _saved.Clear();
        _lock.Dispose();
    }
}
