using System.Globalization;

namespace Kvm.Inventory.Embedded;

/// <summary>
/// The installed PostgreSQL server programs an embedded cluster needs: initdb, pg_ctl and postgres,
/// all from one directory (pg_ctl starts the postgres beside itself).
/// </summary>
public sealed record PostgresBinaries(string Directory, int? MajorVersion)
{
    /// <summary>Where Debian's packages put each major version's server programs.</summary>
    public const string DebianRoot = "/usr/lib/postgresql";

    public static readonly IReadOnlyList<string> Programs = ["initdb", "pg_ctl", "postgres"];

    public string Initdb => Path.Combine(Directory, "initdb");
    public string PgCtl => Path.Combine(Directory, "pg_ctl");
    public string Postgres => Path.Combine(Directory, "postgres");

    /// <summary>
    /// The server programs: in <paramref name="searchDirectories"/> when given (in that order),
    /// else in /usr/lib/postgresql/VERSION/bin (the highest version first; <paramref name="preferMajor"/>,
    /// the version an existing cluster was made by, before all others), else beside an initdb on PATH.
    /// Throws an <see cref="InventoryException"/> naming the places searched and what is missing.
    /// </summary>
    public static PostgresBinaries Find(IReadOnlyList<string>? searchDirectories = null, int? preferMajor = null)
    {
        var candidates = searchDirectories is not null ? [.. searchDirectories] : DefaultCandidates(preferMajor);
        var incomplete = new List<string>();
        foreach (var dir in candidates)
        {
            var missing = Programs.Where(p => !File.Exists(Path.Combine(dir, p))).ToList();
            if (missing.Count == 0)
                return new PostgresBinaries(dir, VersionOf(dir));
            if (missing.Count < Programs.Count)
                incomplete.Add($"{dir} has no {string.Join(", ", missing)}");
        }
        var searched = searchDirectories is not null
            ? string.Join(", ", searchDirectories)
            : $"{DebianRoot}/*/bin and PATH";
        var detail = incomplete.Count > 0 ? $" ({string.Join("; ", incomplete)})" : "";
        throw new InventoryException(
            $"the PostgreSQL server programs ({string.Join(", ", Programs)}) were not found in {searched}{detail}: " +
            "install postgresql (Debian package 'postgresql'), or give kvmd a connection string to a PostgreSQL server");
    }

    private static List<string> DefaultCandidates(int? preferMajor)
    {
        var list = new List<string>();
        if (System.IO.Directory.Exists(DebianRoot))
        {
            var versions = System.IO.Directory.GetDirectories(DebianRoot)
                .Select(d => (Dir: Path.Combine(d, "bin"), Major: ParseMajor(Path.GetFileName(d))))
                .Where(v => v.Major is not null)
                .OrderByDescending(v => v.Major == preferMajor)
                .ThenByDescending(v => v.Major);
            list.AddRange(versions.Select(v => v.Dir));
        }
        // An initdb on PATH is often a symlink (Debian's postgresql-common wrappers, or /usr/local/bin
        // links): the server programs are beside its target.
        foreach (var dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries))
        {
            var initdb = Path.Combine(dir, "initdb");
            if (!File.Exists(initdb))
                continue;
            var target = new FileInfo(initdb).ResolveLinkTarget(returnFinalTarget: true)?.FullName ?? initdb;
            list.Add(Path.GetDirectoryName(target)!);
        }
        return list;
    }

    /// <summary>The major version from a Debian path (/usr/lib/postgresql/15/bin), else from PG_VERSION-like names.</summary>
    private static int? VersionOf(string dir) =>
        Path.GetFileName(Path.TrimEndingDirectorySeparator(dir)) == "bin"
            ? ParseMajor(Path.GetFileName(Path.GetDirectoryName(Path.TrimEndingDirectorySeparator(dir))))
            : null;

    private static int? ParseMajor(string? s) =>
        int.TryParse(s, NumberStyles.None, CultureInfo.InvariantCulture, out var v) ? v : null;
}
