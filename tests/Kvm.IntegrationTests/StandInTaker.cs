namespace Kvm.IntegrationTests;

/// <summary>
/// Stand-ins for the new kvm-vmm of a hand-over (kvm-vmm --take-over SOCKET ...), as Python
/// scripts that speak the hand-over protocol (Kvm.Control/Handover.cs) up to a chosen point and
/// then fail or die there: what a real taker does only when something goes wrong.
/// </summary>
internal static class StandInTaker
{
    /// <summary>
    /// Connects to the giver and takes the offer: hello, "prepared" (building nothing), the offer
    /// received. send(kind, **fields) and receive() (the next message's kind) serve the steps after.
    /// </summary>
    private const string Prologue = """
        #!/usr/bin/env python3
        import json, os, socket, sys
        args = sys.argv[1:]
        opt = lambda name: args[args.index(name) + 1]
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(opt("--take-over"))
        def send(kind, **more):
            conn.sendall((json.dumps(dict(kind=kind, pid=os.getpid(), **more)) + "\n").encode())
        buf = b""
        def receive():
            global buf
            while b"\n" not in buf:
                data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 16)
                for fd in fds:
                    os.close(fd)
                if not data:
                    sys.exit(2)
                buf += data
            line, buf = buf.split(b"\n", 1)
            return json.loads(line)["kind"]
        send("hello")
        assert receive() == "prepare"
        send("prepared")
        assert receive() == "offer"

        """;

    /// <summary>After the offer: says ready, and once told "go" binds its own sockets over the control and console paths (as a real taker does).</summary>
    public const string TakesThePaths = """
        send("ready")
        assert receive() == "go"
        for path in (opt("--control"), opt("--console")):
            temporary = os.path.join(os.path.dirname(path), ".dying-taker")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(temporary)
            s.listen(1)
            os.rename(temporary, path)

        """;

    /// <summary>
    /// Writes an executable script at <paramref name="path"/>: the <see cref="Prologue"/>, then
    /// <paramref name="steps"/> (Python, one statement per line), then exit status 3.
    /// </summary>
    public static string Write(string path, string steps)
    {
        File.WriteAllText(path, Prologue + steps + "sys.exit(3)\n");
        File.SetUnixFileMode(path, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        return path;
    }
}
