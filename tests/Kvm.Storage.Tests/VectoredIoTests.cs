using Kvm.Storage.Qcow2;
using Kvm.Storage.Raw;

namespace Kvm.Storage.Tests;

/// <summary>Scatter/gather reads and writes agree with plain ones, on both formats.</summary>
public sealed class VectoredIoTests : IDisposable
{
    private const ulong MiB = 1 << 20;
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    private IBlockImage Open(string format, ulong size) => format == "raw"
        ? RawImage.Create(_dir.File("v.raw"), size)
        : Qcow2Image.Create(_dir.File("v.qcow2"), new Qcow2CreateOptions { Size = size });

    private static byte[] Random(int n, int seed)
    {
        var b = new byte[n];
        new Random(seed).NextBytes(b);
        return b;
    }

    [Theory]
    [InlineData("raw", new[] { 4096 })]
    [InlineData("raw", new[] { 16384, 16384, 16384, 16384 })]
    [InlineData("raw", new[] { 512, 1536, 70000 - 70000 % 512, 2048 })]
    [InlineData("qcow2", new[] { 16384, 16384, 16384, 16384 })]
    [InlineData("qcow2", new[] { 512, 1536, 70000 - 70000 % 512, 2048 })]
    [InlineData("qcow2", new[] { 1 << 20, 4096 })]      // beyond the bounce limit: one buffer at a time
    public void GatheredWriteThenScatteredReadRoundTrips(string format, int[] sizes)
    {
        using var image = Open(format, 8 * MiB);
        ulong offset = 3 * MiB - 1024;
        var parts = sizes.Select((n, i) => Random(n, i + 1)).ToArray();
        image.Write(offset, parts.Select(p => (ReadOnlyMemory<byte>)p).ToList());

        // The plain read sees the buffers back to back.
        var whole = new byte[sizes.Sum()];
        image.Read(offset, whole);
        Assert.Equal(parts.SelectMany(p => p).ToArray(), whole);

        // A scattered read with other boundaries gets the same bytes.
        var a = new byte[whole.Length / 3];
        var b = new byte[whole.Length - a.Length];
        image.Read(offset, new List<Memory<byte>> { a, b });
        Assert.Equal(whole, a.Concat(b).ToArray());

        // Nothing around the range changed.
        var before = new byte[1024];
        image.Read(offset - 1024, before);
        Assert.All(before, x => Assert.Equal(0, x));
    }

    [Fact]
    public void ScatteredReadPastTheEndOfAShortenedRawFileReadsZeros()
    {
        // preadv comes back short at the end of the file: the rest must read as zeros.
        string path = _dir.File("short.raw");
        using var image = RawImage.Create(path, MiB);
        var data = Random(6000, 9);
        image.Write(0, data);
        using (var f = new FileStream(path, FileMode.Open, FileAccess.Write, FileShare.ReadWrite))
            f.SetLength(6000);

        var a = new byte[4096];
        var b = new byte[8192];
        Array.Fill(b, (byte)0xee);
        image.Read(0, new List<Memory<byte>> { a, b });
        Assert.Equal(data[..4096], a);
        Assert.Equal(data[4096..], b[..(6000 - 4096)]);
        Assert.All(b[(6000 - 4096)..], x => Assert.Equal(0, x));
    }

    [Fact]
    public void GatheredWriteOnAReadOnlyRawImageIsRefused()
    {
        string path = _dir.File("ro.raw");
        RawImage.Create(path, MiB).Dispose();
        using var image = DiskImage.Open(path, new ImageOpenOptions { ReadOnly = true });
        Assert.ThrowsAny<Exception>(() => image.Write(0, new List<ReadOnlyMemory<byte>> { new byte[512], new byte[512] }));
        var back = new byte[1024];
        image.Read(0, back);
        Assert.All(back, x => Assert.Equal(0, x));
    }

    [Fact]
    public void AGatheredWritePastTheEndIsRefused()
    {
        using var image = Open("raw", MiB);
        Assert.Throws<ArgumentOutOfRangeException>(() =>
            image.Write(MiB - 512, new List<ReadOnlyMemory<byte>> { new byte[512], new byte[512] }));
    }
}
