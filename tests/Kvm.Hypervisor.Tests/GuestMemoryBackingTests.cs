using System.Diagnostics;
using System.Globalization;
using Kvm.Interop.Native;
using Kvm.Tests.Shared;
using Microsoft.Win32.SafeHandles;

namespace Kvm.Hypervisor.Tests;

/// <summary>
/// Guest RAM in a memfd, a file or hugetlb pages, shared with other mappings of the same fd: in
/// this process (<see cref="GuestMemory.Attach"/>, /proc/self/fd) and in a child process.
/// </summary>
public class GuestMemoryBackingTests
{
    private const ulong MiB = 1UL << 20;
    private static readonly (ulong, ulong)[] TwoRegions = [(0UL, 1 * MiB), (4UL << 30, 2 * MiB)];

    [Fact]
    public void DefaultBackingIsOneSharedMemfdWithTheRegionsAtConsecutiveOffsets()
    {
        using var m = GuestMemory.Create(TwoRegions);
        Assert.Null(m.BackingFile);
        Assert.Equal([0UL, 1 * MiB], m.Regions.Select(r => r.FileOffset));
        Assert.Equal([new GuestMemoryRange(0, 1 * MiB, 0), new GuestMemoryRange(4UL << 30, 2 * MiB, 1 * MiB)], m.Layout);
        Assert.Equal(3 * (long)MiB, Libc.Lseek(m.BackingFd, 0, Libc.SeekEnd));
        Assert.StartsWith("/memfd:kvm-guest-ram", FdTarget(m.BackingFd.Fd));

        // Each region is a shared mapping of the memfd ("rw-s" in /proc/self/maps), at its offset.
        foreach (var r in m.Regions)
        {
            string line = MapsLine(r.Host);
            string[] f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            Assert.Equal("rw-s", f[1]);
            Assert.Equal(r.FileOffset, ulong.Parse(f[2], NumberStyles.HexNumber));
            Assert.Contains("/memfd:kvm-guest-ram", line);
        }
    }

    [Fact]
    public void LayoutGivenOutOfOrderStillGetsOffsetsInGuestAddressOrder()
    {
        using var m = GuestMemory.Create([(4UL << 30, 2 * MiB), (0UL, 1 * MiB)]);
        Assert.Equal([new GuestMemoryRange(0, 1 * MiB, 0), new GuestMemoryRange(4UL << 30, 2 * MiB, 1 * MiB)], m.Layout);
    }

    [Fact]
    public void AnAttachedMappingSeesWritesBothWaysAndOutlivesTheFirst()
    {
        var first = GuestMemory.Create(TwoRegions);
        using var second = GuestMemory.Attach(first.BackingFd, first.Layout);
        Assert.NotEqual(first.BackingFd.Fd, second.BackingFd.Fd); // its own duplicate
        Assert.NotEqual(first.Regions[1].Host, second.Regions[1].Host);

        first.WriteU64(0x1000, 0x1122334455667788);
        first.Write((4UL << 30) + 2 * MiB - 4, [1, 2, 3, 4]);
        Assert.Equal(0x1122334455667788UL, second.ReadU64(0x1000));
        Assert.Equal([1, 2, 3, 4], second.GetSpan((4UL << 30) + 2 * MiB - 4, 4).ToArray());

        second.WriteU32((4UL << 30) + 8, 0xdeadbeef);
        Assert.Equal(0xdeadbeefu, first.ReadU32((4UL << 30) + 8));

        // The memfd lives while any mapping or fd of it does.
        first.Dispose();
        Assert.Equal(0x1122334455667788UL, second.ReadU64(0x1000));
    }

    [Fact]
    public void TheMemfdOpenedAgainThroughProcSelfFdMapsTheSameBytes()
    {
        using var m = GuestMemory.Create(TwoRegions);
        using SafeFileHandle again = File.OpenHandle($"/proc/self/fd/{m.BackingFd.Fd}", FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);
        using var view = GuestMemory.Attach(again, m.Layout);

        m.WriteU64((4UL << 30) + 0x1234, 0xfeedfacecafebeef);
        Assert.Equal(0xfeedfacecafebeefUL, view.ReadU64((4UL << 30) + 0x1234));
        view.WriteU8(0xfffff, 0x5a);
        Assert.Equal(0x5a, m.ReadU8(0xfffff));
    }

    [Fact]
    public void AChildProcessReadsAndWritesGuestRamThroughProcPidFd()
    {
        // dd opens /proc/OURPID/fd/N: the memfd itself, by another process; offsets are the
        // second region's file offset (1 MiB) plus the address within it.
        using var m = GuestMemory.Create(TwoRegions);
        ulong at = (4UL << 30) + 3 * 4096;
        var pattern = new byte[4096];
        new Random(7).NextBytes(pattern);
        m.Write(at, pattern);
        string fd = $"/proc/{Environment.ProcessId}/fd/{m.BackingFd.Fd}";
        ulong block = (m.Regions[1].FileOffset + (at - m.Regions[1].GuestAddress)) / 4096;

        var (status, read, error) = Run("dd", $"if={fd} bs=4096 skip={block} count=1 status=none");
        Assert.True(status == 0, $"dd failed: {error}");
        Assert.Equal(pattern, read);

        var reply = new byte[4096];
        new Random(8).NextBytes(reply);
        (status, _, error) = Run("dd", $"of={fd} bs=4096 seek={block + 1} count=1 conv=notrunc status=none", reply);
        Assert.True(status == 0, $"dd failed: {error}");
        Assert.Equal(reply, m.GetSpan(at + 4096, 4096).ToArray());
    }

    [SkippableFact]
    public void AChildProcessMapsGuestRamAndSeesTheSameBytes()
    {
        TestEnvironment.RequireProgram("python3", "python3");
        using var m = GuestMemory.Create(TwoRegions);
        ulong at = (4UL << 30) + 5 * 4096 + 100;
        m.Write(at, "written by the VMM"u8);
        ulong offset = m.Regions[1].FileOffset + (at - m.Regions[1].GuestAddress);
        // The child maps the memfd MAP_SHARED, prints what it finds and writes its own bytes.
        string script = $$"""
            import mmap, os, sys
            fd = os.open("/proc/{{Environment.ProcessId}}/fd/{{m.BackingFd.Fd}}", os.O_RDWR)
            mm = mmap.mmap(fd, {{m.TotalSize}}, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            sys.stdout.write(mm[{{offset}}:{{offset + 18}}].decode())
            mm[{{offset + 4096}}:{{offset + 4096 + 17}}] = b"written by python"
            mm.close()
            """;
        var (status, output, error) = Run("python3", "-", System.Text.Encoding.UTF8.GetBytes(script));
        Assert.True(status == 0, $"python3 failed: {error}");
        Assert.Equal("written by the VMM", System.Text.Encoding.UTF8.GetString(output));
        Assert.Equal("written by python"u8.ToArray(), m.GetSpan(at + 4096, 17).ToArray());
    }

    [Fact]
    public void AttachRefusesAnFdShorterThanTheLayout()
    {
        using var small = GuestMemory.Create([(0UL, 1 * MiB)]);
        var e = Assert.Throws<GuestMemoryException>(() => GuestMemory.Attach(small.BackingFd, [new GuestMemoryRange(0, 2 * MiB, 0)]));
        Assert.Contains("holds 1 MiB, less than the 2 MiB", e.Message);
        using var two = GuestMemory.Create([(0UL, 2 * MiB)]);
        e = Assert.Throws<GuestMemoryException>(() => GuestMemory.Attach(two.BackingFd, two.Layout, HugePageMode.HugeTlb));
        Assert.Contains("not on hugetlbfs", e.Message);
        e = Assert.Throws<GuestMemoryException>(() => GuestMemory.Attach(small.BackingFd, [new GuestMemoryRange(0, 4096, 100)]));
        Assert.Contains("not aligned", e.Message);
    }

    [Fact]
    public void AFileBackingKeepsGuestRamInTheFile()
    {
        using var dir = new TempDir();
        string path = Path.Combine(dir.Path, "ram");
        var pattern = new byte[8192];
        new Random(3).NextBytes(pattern);
        using (var m = GuestMemory.Create(TwoRegions, GuestMemoryBacking.InFile(path)))
        {
            Assert.Equal(path, m.BackingFile);
            Assert.Equal(3 * (long)MiB, new FileInfo(path).Length);
            m.Write((4UL << 30) + 4096, pattern);
            m.WriteU32(0x10, 0xabcdef01);
            Assert.Equal("rw-s", MapsLine(m.Regions[0].Host).Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]);
        }

        // The bytes are in the file at each region's offset...
        byte[] file = File.ReadAllBytes(path);
        Assert.Equal(pattern, file.AsSpan((int)(1 * MiB + 4096), pattern.Length).ToArray());
        Assert.Equal(0xabcdef01u, BitConverter.ToUInt32(file, 0x10));

        // ...and a VM made again on the file starts with them.
        using var again = GuestMemory.Create(TwoRegions, GuestMemoryBacking.InFile(path));
        Assert.Equal(pattern, again.GetSpan((4UL << 30) + 4096, pattern.Length).ToArray());
        Assert.Equal(0xabcdef01u, again.ReadU32(0x10));
    }

    [Fact]
    public void AShortFileIsGrownKeepingItsBytesAndALongOneKeepsItsLength()
    {
        using var dir = new TempDir();
        string shortFile = Path.Combine(dir.Path, "short"), longFile = Path.Combine(dir.Path, "long");
        File.WriteAllBytes(shortFile, [9, 8, 7]);
        using (var m = GuestMemory.Create([(0UL, 2 * MiB)], GuestMemoryBacking.InFile(shortFile)))
        {
            Assert.Equal([9, 8, 7, 0], m.GetSpan(0, 4).ToArray());
            Assert.Equal(2 * (long)MiB, new FileInfo(shortFile).Length);
        }
        using (var f = File.Create(longFile))
            f.SetLength(4 * (long)MiB);
        using (GuestMemory.Create([(0UL, 2 * MiB)], GuestMemoryBacking.InFile(longFile)))
            Assert.Equal(4 * (long)MiB, new FileInfo(longFile).Length);
    }

    [SkippableFact]
    public void AFileThatCannotBeGrownIsRefusedNamingIt()
    {
        using var dir = new TempDir();
        // ext4 files end at 16 TiB (4 KiB blocks): growing one to 32 TiB fails with EFBIG.
        Skip.IfNot(FileSystemType(dir.Path) == 0xEF53, $"{dir.Path} is not on ext4");
        string path = Path.Combine(dir.Path, "ram");
        File.WriteAllBytes(path, [1]);
        var e = Assert.Throws<GuestMemoryException>(() => GuestMemory.Create([(0UL, 32UL << 40)], GuestMemoryBacking.InFile(path)));
        Assert.Contains($"'{path}'", e.Message);
        Assert.Contains("holds 1 bytes, less than the 32768 GiB of guest RAM, and cannot be grown", e.Message);
        Assert.Contains("ftruncate", e.Message);
        Assert.Equal(1, new FileInfo(path).Length);

        e = Assert.Throws<GuestMemoryException>(() => GuestMemory.Create([(0UL, 1 * MiB)], GuestMemoryBacking.InFile(dir.Path)));
        Assert.Contains($"cannot open guest memory file '{dir.Path}'", e.Message);
    }

    [Fact]
    public void HugePagesOnAFileNeedTheRightFileSystem()
    {
        using var dir = new TempDir();
        string path = Path.Combine(dir.Path, "ram");
        var e = Assert.Throws<GuestMemoryException>(() => GuestMemory.Create([(0UL, 2 * MiB)], GuestMemoryBacking.InFile(path, HugePageMode.HugeTlb)));
        Assert.Contains($"'{path}' is not on hugetlbfs", e.Message);
        if (FileSystemType(dir.Path) != Libc.TmpfsMagic)
        {
            e = Assert.Throws<GuestMemoryException>(() => GuestMemory.Create([(0UL, 2 * MiB)], GuestMemoryBacking.InFile(path, HugePageMode.Transparent)));
            Assert.Contains($"'{path}' is not on tmpfs", e.Message);
        }
    }

    [Fact]
    public void HugeTlbBeyondTheFreePoolIsRefusedClearly()
    {
        // This host's pool is empty (nr_hugepages 0, left as it is): asking for one page more than
        // is free fails before anything is mapped, saying how to get more.
        ulong free = FreeHugePages();
        ulong size = (free + 1) * GuestMemory.HugePageSize;
        var e = Assert.Throws<GuestMemoryException>(() => GuestMemory.Create([(0UL, size)], HugePageMode.HugeTlb));
        Assert.Contains($"guest memory {GuestMemory.FormatSize(size)} needs hugetlb pages but only {GuestMemory.FormatSize(free * GuestMemory.HugePageSize)} are free", e.Message);
        Assert.Contains("/proc/sys/vm/nr_hugepages", e.Message);
    }

    private static ulong FreeHugePages()
    {
        ulong free = 0, reserved = 0;
        foreach (var line in File.ReadLines("/proc/meminfo"))
        {
            var f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
            if (f[0] == "HugePages_Free:")
                free = ulong.Parse(f[1]);
            else if (f[0] == "HugePages_Rsvd:")
                reserved = ulong.Parse(f[1]);
        }
        return free - reserved;
    }

    /// <summary>The /proc/self/maps line of the mapping that starts at <paramref name="host"/>.</summary>
    internal static string MapsLine(IntPtr host)
    {
        string start = ((ulong)host).ToString("x", CultureInfo.InvariantCulture) + "-";
        return File.ReadLines("/proc/self/maps").Single(l => l.StartsWith(start, StringComparison.Ordinal));
    }

    /// <summary>A "Key: N kB" value of the /proc/self/smaps entry of the mapping that starts at <paramref name="host"/>.</summary>
    internal static ulong SmapsValue(IntPtr host, string key)
    {
        string start = ((ulong)host).ToString("x", CultureInfo.InvariantCulture) + "-";
        bool inside = false;
        foreach (var line in File.ReadLines("/proc/self/smaps"))
        {
            string first = line.Split(' ', 2)[0];
            if (!first.EndsWith(':'))
                inside = line.StartsWith(start, StringComparison.Ordinal);   // a mapping's header line
            else if (inside && first == key + ":")
                return ulong.Parse(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)[1]);
        }
        return 0;
    }

    private static string FdTarget(int fd) => new FileInfo($"/proc/self/fd/{fd}").LinkTarget ?? "";

    /// <summary>The statfs type of the file system holding directory <paramref name="dir"/>.</summary>
    private static long FileSystemType(string dir)
    {
        string probe = Path.Combine(dir, ".fstype");
        using (var h = File.OpenHandle(probe, FileMode.OpenOrCreate, FileAccess.ReadWrite))
        {
            long type = Libc.FileSystemType(h);
            File.Delete(probe);
            return type;
        }
    }

    /// <summary>Runs a program with <paramref name="input"/> on its stdin; its status, stdout bytes and stderr.</summary>
    private static (int Status, byte[] Output, string Error) Run(string program, string arguments, byte[]? input = null)
    {
        var psi = new ProcessStartInfo(program, arguments)
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
        };
        using var p = Process.Start(psi)!;
        var output = new MemoryStream();
        var copy = p.StandardOutput.BaseStream.CopyToAsync(output);
        var error = p.StandardError.ReadToEndAsync();
        if (input is not null)
            p.StandardInput.BaseStream.Write(input);
        p.StandardInput.Close();
        Assert.True(p.WaitForExit(60_000), $"{program} did not finish");
        copy.Wait();
        return (p.ExitCode, output.ToArray(), error.Result);
    }

    internal sealed class TempDir : IDisposable
    {
        public string Path { get; } = Directory.CreateTempSubdirectory("kvm-guestmem-").FullName;
        public void Dispose() => Directory.Delete(Path, recursive: true);
    }
}

/// <summary>
/// Guest RAM in a memfd on transparent huge pages, mapped huge. It turns shmem THP on for its
/// duration (a machine-wide setting; <see cref="ShmemThp"/>), so it runs where the KVM tests run:
/// in the nested KVM host here.
/// </summary>
[Trait(Requires.Trait, Requires.Kvm)]
public class GuestMemoryShmemThpTests
{
    [SkippableFact]
    public void TransparentHugePagesInAMemfdAreMappedHuge()
    {
        using var thp = ShmemThp.Advise();
        Assert.Null(GuestMemory.ShmemThpRefusal());
        using var m = GuestMemory.Create([(0UL, 8UL << 20)], HugePageMode.Transparent);
        Assert.Equal(0UL, (ulong)m.Regions[0].Host % GuestMemory.HugePageSize);
        m.GetWritableSpan(0, 8 << 20).Fill(1);
        ulong pmdMapped = GuestMemoryBackingTests.SmapsValue(m.Regions[0].Host, "ShmemPmdMapped");
        Assert.True(pmdMapped > 0, $"no huge page maps the memfd (ShmemPmdMapped {pmdMapped} kB)");

        // Another mapping of the same memfd gets the same huge pages.
        using var view = GuestMemory.Attach(m.BackingFd, m.Layout, HugePageMode.Transparent);
        Assert.Equal(1, view.ReadU8(5UL << 20));
        Assert.True(GuestMemoryBackingTests.SmapsValue(view.Regions[0].Host, "ShmemPmdMapped") > 0);
    }
}
