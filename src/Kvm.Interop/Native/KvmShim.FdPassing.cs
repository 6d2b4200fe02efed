using System.Net.Sockets;
using System.Runtime.InteropServices;
using Kvm.Interop.Handles;

namespace Kvm.Interop.Native;

/// <summary>Descriptors passed over a unix stream socket (SCM_RIGHTS). Each returns -errno on failure.</summary>
public static unsafe partial class KvmShim
{
    /// <summary>The most descriptors one message carries.</summary>
    public const int MaxPassedFds = 16;

    [LibraryImport(Library, EntryPoint = "kvmshim_send_fds")]
    private static partial long SendFds(SafeHandle socket, byte* buffer, ulong length, int* fds, int count);

    [LibraryImport(Library, EntryPoint = "kvmshim_recv_fds")]
    private static partial long RecvFds(SafeHandle socket, byte* buffer, ulong length, int* fds, int maxFds, out int count);

    /// <summary>
    /// Sends all of <paramref name="data"/> on <paramref name="socket"/> (a connected unix stream
    /// socket in blocking mode), with <paramref name="fds"/> attached to its first byte. The
    /// descriptors stay the caller's: the receiver gets its own copies.
    /// </summary>
    public static void SendWithFds(Socket socket, ReadOnlySpan<byte> data, ReadOnlySpan<SafeHandle> fds)
    {
        if (data.IsEmpty)
            throw new ArgumentException("descriptors need at least one byte of data to travel with", nameof(data));
        if (fds.Length > MaxPassedFds)
            throw new ArgumentException($"at most {MaxPassedFds} descriptors go in one message, not {fds.Length}", nameof(fds));
        var refs = new bool[fds.Length];
        int* raw = stackalloc int[MaxPassedFds];
        try
        {
            for (int i = 0; i < fds.Length; i++)
            {
                fds[i].DangerousAddRef(ref refs[i]);
                raw[i] = (int)fds[i].DangerousGetHandle();
            }
            fixed (byte* p = data)
            {
                long sent;
                while ((sent = SendFds(socket.SafeHandle, p, (ulong)data.Length, raw, fds.Length)) == -Errno.EAGAIN)
                    socket.Poll(1_000_000, SelectMode.SelectWrite);
                if (sent < 0)
                    throw new IOException($"cannot pass descriptors over the socket: sendmsg failed: {Errno.Describe((int)-sent)}");
                if (sent < data.Length)
                    socket.Send(data[(int)sent..]);
            }
        }
        finally
        {
            for (int i = 0; i < fds.Length; i++)
                if (refs[i])
                    fds[i].DangerousRelease();
        }
    }

    /// <summary>
    /// Receives up to <paramref name="buffer"/>'s length of bytes from <paramref name="socket"/>
    /// and the descriptors that came with them (at most <see cref="MaxPassedFds"/>; more is an
    /// error, and none of them is kept). Returns the bytes received, 0 at the end of the stream,
    /// -1 when nothing is waiting on a non-blocking socket.
    /// </summary>
    public static int ReceiveWithFds(Socket socket, Span<byte> buffer, List<ReceivedFdHandle> fds)
    {
        int* raw = stackalloc int[MaxPassedFds];
        fixed (byte* p = buffer)
        {
            long got = RecvFds(socket.SafeHandle, p, (ulong)buffer.Length, raw, MaxPassedFds, out int count);
            if (got == -Errno.EAGAIN)
                return -1;
            if (got < 0)
                throw new IOException(got == -Errno.EMSGSIZE
                    ? $"more than {MaxPassedFds} descriptors came over the socket"
                    : $"cannot receive over the socket: recvmsg failed: {Errno.Describe((int)-got)}");
            for (int i = 0; i < count; i++)
                fds.Add(new ReceivedFdHandle(raw[i]));
            return (int)got;
        }
    }
}
