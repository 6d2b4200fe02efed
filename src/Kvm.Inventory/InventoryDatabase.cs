using Kvm.Inventory.Embedded;
using Kvm.Inventory.Repositories;
using Kvm.Inventory.Schema;
using Npgsql;

namespace Kvm.Inventory;

/// <summary>Where kvmd's inventory lives.</summary>
public sealed record InventoryOptions
{
    /// <summary>
    /// A shared PostgreSQL cluster (what several hosts need), as an Npgsql connection string; null:
    /// kvmd's private cluster under <see cref="StateDirectory"/> (the default, all a single host needs).
    /// </summary>
    public string? ConnectionString { get; init; }

    /// <summary>kvmd's state directory, for the private cluster.</summary>
    public string? StateDirectory { get; init; }

    /// <summary>Adjusts the private cluster's options (the server user, where the programs are).</summary>
    public Func<EmbeddedPostgresOptions, EmbeddedPostgresOptions>? Embedded { get; init; }
}

/// <summary>
/// The opened inventory: its database (shared, or the private cluster this object started and
/// stops when disposed) at the schema version this code knows, and its repositories.
/// </summary>
public sealed class InventoryDatabase : IAsyncDisposable
{
    private InventoryDatabase(NpgsqlDataSource dataSource, EmbeddedPostgres? embedded, MigrationResult schema)
    {
        DataSource = dataSource;
        Embedded = embedded;
        Schema = schema;
        Hosts = new HostRepository(dataSource);
        Vms = new VmRepository(dataSource);
        Events = new EventRepository(dataSource);
        Leases = new LeaseRepository(dataSource);
        Disks = new DiskRepository(dataSource);
        Reservations = new ReservationRepository(dataSource);
    }

    public NpgsqlDataSource DataSource { get; }

    /// <summary>The private cluster, when no connection string was given.</summary>
    public EmbeddedPostgres? Embedded { get; }

    /// <summary>The schema version found, and the migrations this start applied.</summary>
    public MigrationResult Schema { get; }

    public HostRepository Hosts { get; }
    public VmRepository Vms { get; }
    public EventRepository Events { get; }
    public LeaseRepository Leases { get; }
    public DiskRepository Disks { get; }
    public ReservationRepository Reservations { get; }

    /// <summary>Starts following the events after <paramref name="afterId"/> on a connection of its own; dispose it to stop.</summary>
    public InventoryNotifications FollowEvents(long afterId, InventoryNotificationsOptions? options = null) =>
        InventoryNotifications.Start(DataSource, afterId, options);

    /// <summary>Opens the inventory: starts the private cluster if there is no connection string, then migrates the schema.</summary>
    public static async Task<InventoryDatabase> OpenAsync(InventoryOptions options, CancellationToken ct = default)
    {
        EmbeddedPostgres? embedded = null;
        var connectionString = options.ConnectionString;
        if (connectionString is null)
        {
            var state = options.StateDirectory
                ?? throw new InventoryException("the inventory needs either a connection string (a shared PostgreSQL cluster) or a state directory (for kvmd's private cluster)");
            var embeddedOptions = new EmbeddedPostgresOptions { StateDirectory = state };
            embedded = await EmbeddedPostgres.StartAsync(options.Embedded?.Invoke(embeddedOptions) ?? embeddedOptions, ct).ConfigureAwait(false);
            connectionString = embedded.ConnectionString;
        }
        NpgsqlDataSource? dataSource = null;
        try
        {
            dataSource = NpgsqlDataSource.Create(connectionString);
            var schema = await SchemaMigrator.ApplyAsync(dataSource, ct).ConfigureAwait(false);
            return new InventoryDatabase(dataSource, embedded, schema);
        }
        catch (Exception e) when (e is NpgsqlException or TimeoutException or ArgumentException)
        {
            await Close(dataSource, embedded).ConfigureAwait(false);
            var where = embedded is null ? "the PostgreSQL server of the connection string" : $"kvmd's private PostgreSQL cluster (its log: {embedded.LogFile})";
            throw new InventoryException($"cannot open the inventory in {where}", e);
        }
        catch
        {
            await Close(dataSource, embedded).ConfigureAwait(false);
            throw;
        }
    }

    public async ValueTask DisposeAsync() => await Close(DataSource, Embedded).ConfigureAwait(false);

    private static async Task Close(NpgsqlDataSource? dataSource, EmbeddedPostgres? embedded)
    {
        if (dataSource is not null)
            await dataSource.DisposeAsync().ConfigureAwait(false);
        if (embedded is not null)
            await embedded.DisposeAsync().ConfigureAwait(false);
    }
}
