using System.Buffers.Binary;
using System.Globalization;
using System.Net.Sockets;
using Kvm.Interop.Native;

namespace Kvm.Rpc;

/// <summary>
/// The credentials of the process at the other end of a unix socket, as the kernel recorded them
/// when it connected (SO_PEERCRED: pid, uid, gid), and the supplementary groups of that process.
/// </summary>
public readonly record struct PeerCredentials(int Pid, uint Uid, uint Gid)
{
    private const int SolSocket = 1, SoPeerCred = 17;

    /// <summary>The peer of a connected unix socket.</summary>
    public static PeerCredentials Of(Socket socket)
    {
        Span<byte> ucred = stackalloc byte[12];
        int n = socket.GetRawSocketOption(SolSocket, SoPeerCred, ucred);
        if (n != 12)
            throw new IOException($"SO_PEERCRED returned {n} bytes, not 12");
        return new PeerCredentials(
            BinaryPrimitives.ReadInt32LittleEndian(ucred),
            BinaryPrimitives.ReadUInt32LittleEndian(ucred[4..]),
            BinaryPrimitives.ReadUInt32LittleEndian(ucred[8..]));
    }

    /// <summary>This process's own credentials (for a server whose clients are itself, e.g. in tests).</summary>
    public static PeerCredentials Self => new(Environment.ProcessId, Libc.GetEuid(), Libc.GetEgid());

    /// <summary>
    /// Whether the peer process is in group <paramref name="gid"/>: its primary group, or one of the
    /// supplementary groups /proc lists for it (read now: a process that exited counts as not in it).
    /// </summary>
    public bool IsInGroup(uint gid)
    {
        if (Gid == gid)
            return true;
        try
        {
            foreach (var line in File.ReadLines($"/proc/{Pid.ToString(CultureInfo.InvariantCulture)}/status"))
            {
                if (!line.StartsWith("Groups:", StringComparison.Ordinal))
                    continue;
                foreach (var g in line["Groups:".Length..].Split([' ', '\t'], StringSplitOptions.RemoveEmptyEntries))
                {
                    if (uint.TryParse(g, NumberStyles.None, CultureInfo.InvariantCulture, out uint v) && v == gid)
                        return true;
                }
                return false;
            }
        }
        catch (IOException)
        {
        }
        catch (UnauthorizedAccessException)
        {
        }
        return false;
    }

    public override string ToString() => $"pid {Pid}, uid {Uid}, gid {Gid}";
}

/// <summary>
/// Who may use a socket: root, the server's own user, and members of one group (the socket file's
/// group, default <c>kvm</c>). Everyone else is refused after connecting, by their credentials.
/// </summary>
public sealed record RpcAccessPolicy(uint? GroupId, string? GroupName)
{
    /// <summary>Root and this process's user only.</summary>
    public static RpcAccessPolicy OwnerOnly { get; } = new(null, null);

    /// <summary>The policy for a group looked up by name; a group that does not exist is an error naming it.</summary>
    public static RpcAccessPolicy ForGroup(string name)
    {
        uint? gid = Libc.GroupId(name);
        if (gid is null)
            throw new ArgumentException($"group '{name}' does not exist (create it with 'groupadd --system {name}', or choose another with --group)");
        return new RpcAccessPolicy(gid, name);
    }

    /// <summary>Null when the peer may connect; otherwise why not.</summary>
    public string? Refusal(PeerCredentials peer)
    {
        if (peer.Uid == 0 || peer.Uid == Libc.GetEuid())
            return null;
        if (GroupId is { } gid && peer.IsInGroup(gid))
            return null;
        return GroupId is null
            ? $"permission denied: uid {peer.Uid} is neither root nor the server's user"
            : $"permission denied: uid {peer.Uid} is neither root nor a member of group '{GroupName}' ({GroupId})";
    }
}
