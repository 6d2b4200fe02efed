using System.Threading.Channels;
using Kvm.Inventory.Repositories;
using Npgsql;

namespace Kvm.Inventory;

/// <summary>What <see cref="InventoryNotifications"/> delivers: an event, or a call to re-read the cached view.</summary>
public abstract record InventoryNotice;

/// <summary>An event of the inventory, delivered once.</summary>
public sealed record EventNotice(EventRow Event) : InventoryNotice;

/// <summary>
/// The connection was lost and made again: events went by unwatched (they follow this notice,
/// none lost), and whatever the consumer keeps from the inventory must be re-read before it trusts
/// the stream again. <see cref="Reason"/> is what broke; <see cref="LastDeliveredId"/> is the
/// last event delivered before.
/// </summary>
public sealed record ResyncNotice(string Reason, long LastDeliveredId) : InventoryNotice;

/// <summary>How <see cref="InventoryNotifications"/> reconnects and re-reads.</summary>
public sealed record InventoryNotificationsOptions
{
    /// <summary>The first wait before reconnecting; it doubles at each failure in a row, up to <see cref="MaxBackoff"/>.</summary>
    public TimeSpan MinBackoff { get; init; } = TimeSpan.FromMilliseconds(100);
    public TimeSpan MaxBackoff { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>How often the events are read when no notification comes (a safety net, and the re-check of gaps).</summary>
    public TimeSpan PollInterval { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>
    /// How long an id missing below the last one delivered is waited for: a transaction that took
    /// an id and has not committed yet. After this the id is taken for rolled back.
    /// </summary>
    public TimeSpan GapGrace { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>How many events one read takes.</summary>
    public int BatchSize { get; init; } = 500;

    /// <summary>How many notices wait for the consumer before the reader waits for it.</summary>
    public int Capacity { get; init; } = 1000;
}

/// <summary>
/// Follows the inventory's events: one dedicated connection listens on <see cref="Channel"/>, and
/// each notification (or, without one, every <see cref="InventoryNotificationsOptions.PollInterval"/>)
/// makes it read the events after the last id it delivered, from the table: notifications only
/// wake it, so none lost with a connection loses an event. Events come out once each, in id order,
/// except one whose transaction committed after a later id was read: it comes when it appears
/// (within <see cref="InventoryNotificationsOptions.GapGrace"/>), in commit order. When the
/// connection breaks it reconnects with a growing backoff, delivers a <see cref="ResyncNotice"/>,
/// then everything after the last id delivered.
/// </summary>
public sealed class InventoryNotifications : IAsyncDisposable
{
    /// <summary>The channel schema v2's trigger announces each event on.</summary>
    public const string Channel = "kvm_events";

    private readonly NpgsqlDataSource _db;
    private readonly InventoryNotificationsOptions _options;
    private readonly Channel<InventoryNotice> _out;
    private readonly CancellationTokenSource _stop = new();
    private readonly SortedDictionary<long, long> _gaps = [];
    private readonly Task _loop;
    private long _last;
    private volatile bool _notified;
    private int _listener;
    private int _reconnects;

    private InventoryNotifications(NpgsqlDataSource db, long afterId, InventoryNotificationsOptions options)
    {
        _db = db;
        _options = options;
        _last = afterId;
        _out = System.Threading.Channels.Channel.CreateBounded<InventoryNotice>(
            new BoundedChannelOptions(options.Capacity) { SingleWriter = true, FullMode = BoundedChannelFullMode.Wait });
        _loop = Task.Run(() => RunAsync(_stop.Token));
    }

    /// <summary>Starts following the events after <paramref name="afterId"/> (0: all of them).</summary>
    public static InventoryNotifications Start(NpgsqlDataSource db, long afterId, InventoryNotificationsOptions? options = null)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(afterId);
        return new(db, afterId, options ?? new());
    }

    /// <summary>The notices, in order; the stream ends when this object is disposed.</summary>
    public ChannelReader<InventoryNotice> Reader => _out.Reader;

    public IAsyncEnumerable<InventoryNotice> ReadAllAsync(CancellationToken ct = default) => _out.Reader.ReadAllAsync(ct);

    /// <summary>The last event id handed to the channel.</summary>
    public long LastDeliveredId => Interlocked.Read(ref _last);

    /// <summary>The server process of the listening connection, while there is one (0: none).</summary>
    public int ListenerProcessId => Volatile.Read(ref _listener);

    /// <summary>How many times the connection was made again after a failure.</summary>
    public int Reconnects => Volatile.Read(ref _reconnects);

    /// <summary>The last failure of the connection, if any.</summary>
    public Exception? LastError { get; private set; }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync().ConfigureAwait(false);
        try
        {
            await _loop.ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
        }
        _stop.Dispose();
    }

    private async Task RunAsync(CancellationToken ct)
    {
        var backoff = _options.MinBackoff;
        var connectedOnce = false;
        string? lost = null;
        try
        {
            while (true)
            {
                try
                {
                    await using var conn = await _db.OpenConnectionAsync(ct).ConfigureAwait(false);
                    conn.Notification += (_, _) => _notified = true;
                    await using (var listen = new NpgsqlCommand($"listen {Channel}", conn))
                        await listen.ExecuteNonQueryAsync(ct).ConfigureAwait(false);
                    if (connectedOnce)
                    {
                        Interlocked.Increment(ref _reconnects);
                        await _out.Writer.WriteAsync(new ResyncNotice(lost ?? "the connection was lost", LastDeliveredId), ct).ConfigureAwait(false);
                    }
                    connectedOnce = true;
                    Volatile.Write(ref _listener, conn.ProcessID);
                    backoff = _options.MinBackoff;
                    while (true)
                    {
                        // A notification that arrives while reading sets the flag again: read again
                        // rather than wait for one that has already come.
                        _notified = false;
                        await CatchUpAsync(conn, ct).ConfigureAwait(false);
                        if (!_notified)
                            await conn.WaitAsync(_gaps.Count > 0 ? Min(_options.PollInterval, TimeSpan.FromSeconds(1)) : _options.PollInterval, ct).ConfigureAwait(false);
                    }
                }
                catch (Exception e) when (!ct.IsCancellationRequested && e is NpgsqlException or TimeoutException or InventoryException or IOException)
                {
                    Volatile.Write(ref _listener, 0);
                    LastError = e;
                    lost = e.Message;
                    await Task.Delay(backoff, ct).ConfigureAwait(false);
                    backoff = Min(backoff * 2, _options.MaxBackoff);
                }
            }
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            _out.Writer.TryComplete();
        }
        catch (Exception e)
        {
            // Not a failure of the connection: the consumer's stream ends with it.
            _out.Writer.TryComplete(new InventoryException("following the inventory's events failed", e));
        }
        finally
        {
            Volatile.Write(ref _listener, 0);
        }
    }

    /// <summary>Delivers the gaps that have appeared, then every event after the last one delivered.</summary>
    private async Task CatchUpAsync(NpgsqlConnection conn, CancellationToken ct)
    {
        if (_gaps.Count > 0)
        {
            var last = LastDeliveredId;
            foreach (var row in await EventRepository.ReadRangeAsync(conn, _gaps.First().Key, last).ConfigureAwait(false))
            {
                if (_gaps.Remove(row.Id))
                    await _out.Writer.WriteAsync(new EventNotice(row), ct).ConfigureAwait(false);
            }
            var expired = Environment.TickCount64 - (long)_options.GapGrace.TotalMilliseconds;
            foreach (var id in _gaps.Where(g => g.Value < expired).Select(g => g.Key).ToList())
                _gaps.Remove(id);
        }
        while (true)
        {
            var rows = await EventRepository.ReadAfterAsync(conn, LastDeliveredId, _options.BatchSize).ConfigureAwait(false);
            foreach (var row in rows)
            {
                // Ids below this one not seen yet: taken by transactions still running (or
                // rolled back).
                var now = Environment.TickCount64;
                for (var id = Math.Max(LastDeliveredId + 1, row.Id - MaxGaps); id < row.Id; id++)
                    _gaps[id] = now;
                await _out.Writer.WriteAsync(new EventNotice(row), ct).ConfigureAwait(false);
                Interlocked.Exchange(ref _last, row.Id);
            }
            // Watch only the ids just below the last one: the range re-read above stays short.
            while (_gaps.Count > 0 && _gaps.First().Key < LastDeliveredId - MaxGaps)
                _gaps.Remove(_gaps.First().Key);
            if (rows.Count < _options.BatchSize)
                return;
        }
    }

    private const int MaxGaps = 4096;

    private static TimeSpan Min(TimeSpan a, TimeSpan b) => a < b ? a : b;
}
