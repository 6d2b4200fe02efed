using System.Runtime.InteropServices;

namespace Kvm.Interop.Native;

/// <summary>
/// Declarations of native/kvmshim. Every function returns a non-negative value on success and
/// -errno on failure; <see cref="Errno.Check"/> turns a failure into an exception.
/// </summary>
public static unsafe partial class KvmShim
{
    // The file's own name (libkvmshim.so), so that the first path the runtime tries, beside the
    // program, finds it. Named "kvmshim", the runtime tried kvmshim.so beside the program, then
    // dlopen's search of every system library folder (about 55 failed lookups, on virtiofs in the
    // nested KVM host), and only then libkvmshim.so beside the program.
    public const string Library = "libkvmshim";

    [LibraryImport(Library, EntryPoint = "kvmshim_layout", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Layout(string name);

    [LibraryImport(Library, EntryPoint = "kvmshim_open", StringMarshalling = StringMarshalling.Utf8)]
    public static partial int Open(string path);

    [LibraryImport(Library, EntryPoint = "kvmshim_kick_init")]
    public static partial int KickInit();

    [LibraryImport(Library, EntryPoint = "kvmshim_thread_self")]
    public static partial ulong ThreadSelf();

    [LibraryImport(Library, EntryPoint = "kvmshim_kick")]
    public static partial int Kick(ulong thread, int signal);

    [LibraryImport(Library, EntryPoint = "kvmshim_term_cbreak")]
    public static partial int TermCbreak(int fd);

    [LibraryImport(Library, EntryPoint = "kvmshim_term_restore")]
    public static partial int TermRestore();
}
