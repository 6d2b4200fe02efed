using System.Diagnostics;
using System.Globalization;
using Kvm.Interop.Native;

namespace Kvm.Inventory.Embedded;

/// <summary>
/// The account the embedded server's programs run as. PostgreSQL refuses to run as root, so a kvmd
/// running as root runs initdb, pg_ctl and postgres as another user (by default 'postgres', which
/// Debian's postgresql package creates) through setpriv(1), and gives that user the cluster's
/// directory. A kvmd running as any other user runs them as itself (<see cref="Self"/>).
/// </summary>
public sealed record ServerAccount(string Name, uint Uid, uint Gid)
{
    /// <summary>The default user a root kvmd runs the server as.</summary>
    public const string DefaultUser = "postgres";

    /// <summary>Null: the programs run as this process's own user.</summary>
    public static ServerAccount? Self => null;

    /// <summary>
    /// The account for this process: null when it is not root (the server runs as this user);
    /// when root, <paramref name="user"/> (default 'postgres') looked up through NSS (getent), or an
    /// error saying how to provide one.
    /// </summary>
    public static ServerAccount? ForThisProcess(string? user)
    {
        if (Libc.GetEuid() != 0)
            return null;
        var name = user ?? DefaultUser;
        return Lookup(name) ?? throw new InventoryException(
            $"kvmd runs as root and PostgreSQL refuses to run as root, so the embedded cluster runs as user '{name}', " +
            $"which does not exist: install postgresql (its package creates the user 'postgres'), create a system user " +
            $"(adduser --system --group {name}), or name an existing one");
    }

    /// <summary>A user by name through NSS (getent passwd), or null when there is none.</summary>
    public static ServerAccount? Lookup(string name)
    {
        if (name.Length == 0 || name.Contains(':') || name.Contains('\n'))
            throw new InventoryException($"'{name}' is not a user name");
        var psi = new ProcessStartInfo("getent") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.ArgumentList.Add("passwd");
        psi.ArgumentList.Add(name);
        using var p = Process.Start(psi) ?? throw new InventoryException("cannot run getent to look up a user");
        var line = p.StandardOutput.ReadToEnd();
        p.WaitForExit();
        var f = line.Split(':');
        if (p.ExitCode != 0 || f.Length < 4)
            return null;
        if (f[2] == "0")
            throw new InventoryException($"user '{name}' is root (uid 0), and PostgreSQL refuses to run as root: name an unprivileged user");
        return new ServerAccount(name,
            uint.Parse(f[2], CultureInfo.InvariantCulture), uint.Parse(f[3], CultureInfo.InvariantCulture));
    }

    /// <summary>Makes this account the owner of <paramref name="path"/>.</summary>
    public void Own(string path)
    {
        if (Libc.Chown(path, Uid, Gid) != 0)
            throw new InventoryException($"cannot give {path} to user '{Name}' (uid {Uid}): chown failed with errno {System.Runtime.InteropServices.Marshal.GetLastPInvokeError()}");
    }
}
