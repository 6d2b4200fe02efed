using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using Kvm.Interop.Handles;
using Kvm.Interop.Native;

namespace Kvm.Interop.Tests;

/// <summary>
/// Descriptors passed over a unix stream socket (SCM_RIGHTS), as a VM's guest RAM memfd goes to
/// the kvm-vmm that takes the VM over: the receiver's descriptor opens the same file.
/// </summary>
public sealed class FdPassingTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("kvm-fdpass-").FullName;
    private readonly Socket _a, _b;

    public FdPassingTests()
    {
        string path = Path.Combine(_dir, "s");
        using var listener = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        listener.Bind(new UnixDomainSocketEndPoint(path));
        listener.Listen(1);
        _a = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        _a.Connect(new UnixDomainSocketEndPoint(path));
        _b = listener.Accept();
    }

    public void Dispose()
    {
        _a.Dispose();
        _b.Dispose();
        Directory.Delete(_dir, recursive: true);
    }

    private static unsafe MemoryFdHandle Memfd(string content)
    {
        var fd = new MemoryFdHandle(Libc.MemfdCreate("kvm-fdpass-test", Libc.MfdCloexec));
        Assert.False(fd.IsInvalid);
        var bytes = Encoding.ASCII.GetBytes(content);
        fixed (byte* p = bytes)
            Assert.Equal(bytes.Length, (int)Libc.Write(fd, p, (nuint)bytes.Length));
        return fd;
    }

    private static unsafe string ReadAll(SafeFdHandle fd)
    {
        Assert.Equal(0, Libc.Lseek(fd, 0, Libc.SeekSet));
        var buffer = new byte[256];
        fixed (byte* p = buffer)
        {
            nint n = Libc.Read(fd, p, (nuint)buffer.Length);
            Assert.True(n >= 0);
            return Encoding.ASCII.GetString(buffer, 0, (int)n);
        }
    }

    [Fact]
    public void AMemfdSentIsTheSameFileOnTheOtherSide_AndTheDataComesWithIt()
    {
        using var one = Memfd("guest ram");
        using var two = Memfd("second");
        byte[] data = Encoding.ASCII.GetBytes("offer\n");
        KvmShim.SendWithFds(_a, data, [one, two]);

        var fds = new List<ReceivedFdHandle>();
        var buffer = new byte[64];
        int n = KvmShim.ReceiveWithFds(_b, buffer, fds);
        try
        {
            Assert.Equal("offer\n", Encoding.ASCII.GetString(buffer, 0, n));
            Assert.Equal(2, fds.Count);
            Assert.NotEqual(one.Fd, fds[0].Fd);
            Assert.Equal("guest ram", ReadAll(fds[0]));
            Assert.Equal("second", ReadAll(fds[1]));
            // One file: a write through the received descriptor shows through the sender's.
            unsafe
            {
                byte x = (byte)'G';
                Assert.Equal(0, Libc.Lseek(fds[0], 0, Libc.SeekSet));
                Assert.Equal(1, (int)Libc.Write(fds[0], &x, 1));
            }
            Assert.Equal("Guest ram", ReadAll(one));
        }
        finally
        {
            foreach (var fd in fds)
                fd.Dispose();
        }
    }

    [Fact]
    public void WithoutDescriptorsOnlyTheDataComes_AndTheEndOfTheStreamIsZero()
    {
        _a.Send(Encoding.ASCII.GetBytes("plain"));
        var fds = new List<ReceivedFdHandle>();
        var buffer = new byte[64];
        Assert.Equal(5, KvmShim.ReceiveWithFds(_b, buffer, fds));
        Assert.Empty(fds);
        _a.Shutdown(SocketShutdown.Send);
        Assert.Equal(0, KvmShim.ReceiveWithFds(_b, buffer, fds));
    }

    [Fact]
    public void TooManyDescriptorsOrNoDataAreRefusedBeforeAnythingIsSent()
    {
        using var fd = Memfd("x");
        var many = Enumerable.Repeat<SafeHandle>(fd, KvmShim.MaxPassedFds + 1).ToArray();
        Assert.Throws<ArgumentException>(() => KvmShim.SendWithFds(_a, "x"u8, many));
        Assert.Throws<ArgumentException>(() => KvmShim.SendWithFds(_a, ReadOnlySpan<byte>.Empty, [fd]));
        Assert.Equal(0, _b.Available);
    }
}
