using Kvm.Inventory.Embedded;
using Npgsql;

namespace Kvm.Inventory.Tests;

/// <summary>
/// One embedded cluster shared by the tests of the "cluster" collection; each test gets a fresh
/// database of its own from <see cref="NewDatabaseAsync"/>.
/// </summary>
public sealed class ClusterFixture : IAsyncLifetime
{
    private readonly TempState _state = PostgresTestKit.NewStateDirectory();
    private readonly List<NpgsqlDataSource> _sources = [];
    private EmbeddedPostgres? _pg;
    private int _next;

    /// <summary>Why the cluster could not start (the tests skip, or fail under CI, with it).</summary>
    public string? Unavailable { get; private set; }

    public EmbeddedPostgres Server => _pg ?? throw new InvalidOperationException(Unavailable);

    public async Task InitializeAsync()
    {
        Unavailable = PostgresTestKit.ServerUnavailable();
        if (Unavailable is null)
            _pg = await EmbeddedPostgres.StartAsync(PostgresTestKit.Options(_state.Path));
    }

    /// <summary>A new, empty database on the shared cluster; its name is in the connection string.</summary>
    public async Task<(NpgsqlDataSource Db, string ConnectionString)> NewDatabaseAsync()
    {
        Kvm.Tests.Shared.TestEnvironment.SkipIf(Unavailable);
        var name = $"t{Interlocked.Increment(ref _next)}";
        await PostgresTestKit.ExecuteAsync(Server.ConnectionStringFor("postgres"), $"create database {name}");
        var cs = Server.ConnectionStringFor(name);
        var db = NpgsqlDataSource.Create(cs);
        lock (_sources)
            _sources.Add(db);
        return (db, cs);
    }

    public async Task DisposeAsync()
    {
        foreach (var s in _sources)
            await s.DisposeAsync();
        if (_pg is not null)
            await _pg.DisposeAsync();
        _state.Dispose();
    }
}

[CollectionDefinition(Name)]
public sealed class ClusterCollection : ICollectionFixture<ClusterFixture>
{
    public const string Name = "cluster";
}
