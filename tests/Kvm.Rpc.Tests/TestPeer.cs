using System.Reflection;
using Kvm.Tests.Shared;

namespace Kvm.Rpc.Tests;

/// <summary>tests/Kvm.Rpc.TestPeer's RpcTestPeer.dll and the dotnet host that runs it.</summary>
public static class TestPeer
{
    public static string DotnetHost()
    {
        if (Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host && File.Exists(host))
            return host;
        if (Environment.ProcessPath is { } self && Path.GetFileNameWithoutExtension(self) == "dotnet")
            return self;
        return TestEnvironment.FindOnPath("dotnet") ?? "dotnet";
    }

    /// <summary>RpcTestPeer.dll: next to this assembly, else in the peer project's output folder recorded at build time.</summary>
    public static string Find()
    {
        var candidates = new List<string> { AppContext.BaseDirectory };
        foreach (var m in typeof(TestPeer).Assembly.GetCustomAttributes<AssemblyMetadataAttribute>())
        {
            if (m.Key == "TestPeerDirectory" && m.Value is { Length: > 0 })
                candidates.Add(m.Value);
        }
        foreach (var dir in candidates)
        {
            string dll = Path.GetFullPath(Path.Combine(dir, "RpcTestPeer.dll"));
            if (File.Exists(dll) && File.Exists(Path.ChangeExtension(dll, ".runtimeconfig.json")))
                return dll;
        }
        throw new FileNotFoundException($"RpcTestPeer.dll is in none of {string.Join(", ", candidates)} (build tests/Kvm.Rpc.TestPeer)");
    }

    /// <summary>
    /// A copy of the peer's build output in a fresh directory that every user can read (dirs 0755,
    /// files 0644), for running it as nobody; plus a writable home for the dotnet host.
    /// </summary>
    public static (string Dll, string Home) CopyForEveryone(TempDir into)
    {
        string source = Path.GetDirectoryName(Find())!;
        string target = Path.Combine(into.Path, "peer");
        string home = Path.Combine(into.Path, "home");
        if (Directory.Exists(target))
            return (Path.Combine(target, "RpcTestPeer.dll"), home);
        CopyTree(source, target);
        Directory.CreateDirectory(home);
        File.SetUnixFileMode(home, (UnixFileMode)Convert.ToInt32("777", 8));
        return (Path.Combine(target, "RpcTestPeer.dll"), home);
    }

    private static void CopyTree(string from, string to)
    {
        Directory.CreateDirectory(to);
        File.SetUnixFileMode(to, (UnixFileMode)Convert.ToInt32("755", 8));
        foreach (var f in Directory.GetFiles(from))
        {
            string t = Path.Combine(to, Path.GetFileName(f));
            File.Copy(f, t);
            File.SetUnixFileMode(t, (UnixFileMode)Convert.ToInt32("644", 8));
        }
        foreach (var d in Directory.GetDirectories(from))
            CopyTree(d, Path.Combine(to, Path.GetFileName(d)));
    }
}
