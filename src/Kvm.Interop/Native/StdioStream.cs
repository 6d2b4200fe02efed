using System.Runtime.InteropServices;
using Kvm.Interop.Handles;

namespace Kvm.Interop.Native;

/// <summary>
/// A stream over a standard fd with plain read(2)/write(2): no file position of its own (so output
/// appended to a file lands after what others wrote), and none of .NET's console handling (which
/// switches a terminal's keypad mode and, for input, runs its own echoing line editor).
/// With <paramref name="discardOnBrokenPipe"/>, a reader that went away (EPIPE: <c>vmctl list | head -1</c>)
/// makes the writes from then on succeed without effect, as .NET's console streams do on Unix,
/// rather than throw from whatever printed next.
/// </summary>
public sealed unsafe class StdioStream(StdioHandle fd, FileAccess access, bool discardOnBrokenPipe = false) : Stream
{
    private volatile bool _broken;

    public override bool CanRead => access.HasFlag(FileAccess.Read);
    public override bool CanWrite => access.HasFlag(FileAccess.Write);
    public override bool CanSeek => false;
    public override long Length => throw new NotSupportedException();
    public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }

    public override void Write(ReadOnlySpan<byte> buffer)
    {
        while (!buffer.IsEmpty && !_broken)
        {
            nint n;
            fixed (byte* p = buffer)
                n = Libc.Write(fd, p, (nuint)buffer.Length);
            if (n < 0)
            {
                int errno = Marshal.GetLastPInvokeError();
                if (errno == Errno.EINTR)
                    continue;
                if (errno == Errno.EPIPE && discardOnBrokenPipe)
                {
                    _broken = true;
                    return;
                }
                throw new IOException($"write to fd {fd.Fd} failed: {Errno.Describe(errno)}", errno);
            }
            buffer = buffer[(int)n..];
        }
    }

    public override void Write(byte[] buffer, int offset, int count) => Write(buffer.AsSpan(offset, count));

    public override int Read(Span<byte> buffer)
    {
        while (true)
        {
            nint n;
            fixed (byte* p = buffer)
                n = Libc.Read(fd, p, (nuint)buffer.Length);
            if (n >= 0)
                return (int)n;
            int errno = Marshal.GetLastPInvokeError();
            if (errno != Errno.EINTR)
                throw new IOException($"read from fd {fd.Fd} failed: {Errno.Describe(errno)}", errno);
        }
    }

    public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));
    public override void Flush() { }
    public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
    public override void SetLength(long value) => throw new NotSupportedException();
}
