using Kvm.Inventory;
using Kvm.Inventory.Repositories;
using Microsoft.Extensions.Logging;

namespace Kvm.Cluster;

/// <summary>
/// What kvmd keeps of the inventory: every VM's row and every host's name, read once and kept
/// current from the inventory's notifications (LISTEN/NOTIFY, through <see cref="InventoryNotifications"/>)
/// rather than read again for every request. Any event about a VM or a host makes the next read
/// go to the database; so does this host's own write (<see cref="Invalidate"/>), so a client reads
/// what it just did.
/// <para>
/// The view is trusted only while the notification connection is up and every reconnection has
/// been followed by a full re-read: while it is down, or between a reconnection and its re-read,
/// every read goes to the database (and fails if the database cannot be reached) instead of
/// answering from what may have changed unseen.
/// </para>
/// It also lets callers wait for an event (a disk's reservation released) without polling.
/// </summary>
public sealed partial class InventoryView : IAsyncDisposable
{
    private readonly InventoryDatabase _db;
    private readonly ILogger _logger;
    private readonly InventoryNotifications _follower;
    private readonly Task _consumer;
    private readonly Lock _waitersLock = new();
    private readonly List<Waiter> _waiters = [];
    private long _version;
    private readonly Slot<IReadOnlyList<VmRow>> _vms = new();
    private readonly Slot<IReadOnlyDictionary<Guid, string>> _hosts = new();
    private int _resyncsSeen;
    private long _notices, _hits, _reads;

    private sealed record Cached<T>(long Version, T Value);

    private sealed class Slot<T>
    {
        public volatile Cached<T>? Value;
    }

    private sealed record Waiter(Func<EventRow, bool> Match, TaskCompletionSource<EventRow?> Done);

    private InventoryView(InventoryDatabase db, ILogger logger, long afterId, InventoryNotificationsOptions? options)
    {
        _db = db;
        _logger = logger;
        _follower = db.FollowEvents(afterId, options);
        _consumer = Task.Run(ConsumeAsync);
    }

    /// <summary>Starts following the inventory from its newest event on.</summary>
    public static async Task<InventoryView> StartAsync(InventoryDatabase db, ILogger logger, InventoryNotificationsOptions? options = null, CancellationToken cancel = default)
    {
        long newest = await db.Events.NewestIdAsync(cancel).ConfigureAwait(false);
        return new InventoryView(db, logger, newest, options);
    }

    /// <summary>
    /// True while what is cached may be answered from: the notification connection is up and the
    /// last reconnection (if any) has been followed by a re-read.
    /// </summary>
    public bool Trusted
    {
        get
        {
            // The follower counts a reconnection before it sends its resync notice and marks the
            // connection up only after that: up, and no reconnection unhandled, means current.
            if (_follower.ListenerProcessId == 0)
                return false;
            return _follower.Reconnects == Volatile.Read(ref _resyncsSeen);
        }
    }

    /// <summary>How the view has fared, for daemon.status.</summary>
    public ViewStatus Status() => new(Trusted, _follower.ListenerProcessId, _follower.Reconnects, Volatile.Read(ref _resyncsSeen),
        Interlocked.Read(ref _notices), _follower.LastDeliveredId, Interlocked.Read(ref _hits), Interlocked.Read(ref _reads),
        _follower.LastError?.Message);

    /// <summary>Forgets what is cached: the next read goes to the database. Call after a write.</summary>
    public void Invalidate() => Interlocked.Increment(ref _version);

    /// <summary>Every VM, by name.</summary>
    public Task<IReadOnlyList<VmRow>> VmsAsync(CancellationToken cancel) =>
        ReadAsync(_vms, () => _db.Vms.ListAsync(cancel));

    /// <summary>VM <paramref name="name"/>'s row, or null.</summary>
    public async Task<VmRow?> FindVmAsync(string name, CancellationToken cancel) =>
        (await VmsAsync(cancel).ConfigureAwait(false)).FirstOrDefault(v => v.Name == name);

    /// <summary>Every host's name by id.</summary>
    public Task<IReadOnlyDictionary<Guid, string>> HostNamesAsync(CancellationToken cancel) =>
        ReadAsync(_hosts, async () => (IReadOnlyDictionary<Guid, string>)(await _db.Hosts.ListAsync(cancel).ConfigureAwait(false)).ToDictionary(h => h.Id, h => h.Name));

    private async Task<T> ReadAsync<T>(Slot<T> slot, Func<Task<T>> read) where T : class
    {
        long version = Interlocked.Read(ref _version);
        bool trusted = Trusted;
        if (slot.Value is { } cached && cached.Version == version && trusted)
        {
            Interlocked.Increment(ref _hits);
            return cached.Value;
        }
        Interlocked.Increment(ref _reads);
        var value = await read().ConfigureAwait(false);
        // Kept only if nothing changed meanwhile and the view was and is current.
        if (trusted && Trusted && Interlocked.Read(ref _version) == version)
            slot.Value = new Cached<T>(version, value);
        return value;
    }

    /// <summary>
    /// Waits until an event matching <paramref name="match"/> arrives after this call, or the
    /// notification connection is re-made (events may have gone unseen: the caller checks again),
    /// or <paramref name="timeout"/> passes. Returns the event, or null for the other two.
    /// </summary>
    public async Task<EventRow?> WaitForAsync(Func<EventRow, bool> match, TimeSpan timeout, CancellationToken cancel)
    {
        var waiter = new Waiter(match, new TaskCompletionSource<EventRow?>(TaskCreationOptions.RunContinuationsAsynchronously));
        lock (_waitersLock)
            _waiters.Add(waiter);
        try
        {
            return await waiter.Done.Task.WaitAsync(timeout, cancel).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            return null;
        }
        finally
        {
            lock (_waitersLock)
                _waiters.Remove(waiter);
        }
    }

    private async Task ConsumeAsync()
    {
        try
        {
            await foreach (var notice in _follower.ReadAllAsync().ConfigureAwait(false))
            {
                switch (notice)
                {
                    case EventNotice { Event: var e }:
                        Interlocked.Increment(ref _notices);
                        if (e.Subject.StartsWith("vm/", StringComparison.Ordinal) || e.Subject.StartsWith("host/", StringComparison.Ordinal))
                            Invalidate();
                        Complete(w => w.Match(e), e);
                        break;
                    case ResyncNotice resync:
                        // Events went by unseen: forget everything, then trust again (the next
                        // read is a full one). Waiters look again for themselves.
                        Invalidate();
                        Volatile.Write(ref _resyncsSeen, _follower.Reconnects);
                        LogResync(_logger, resync.Reason, resync.LastDeliveredId);
                        Complete(_ => true, null);
                        break;
                }
            }
        }
        catch (Exception e) when (e is InventoryException or OperationCanceledException)
        {
            LogFollowEnded(_logger, e.Message);
        }
    }

    private void Complete(Func<Waiter, bool> which, EventRow? e)
    {
        lock (_waitersLock)
            foreach (var w in _waiters)
                if (which(w))
                    w.Done.TrySetResult(e);
    }

    public async ValueTask DisposeAsync()
    {
        await _follower.DisposeAsync().ConfigureAwait(false);
        await _consumer.ConfigureAwait(false);
    }

    [LoggerMessage(EventId = 2130, Level = LogLevel.Warning, Message = "the inventory's notification connection was made again ({Reason}); the cached view is read again (events after {LastId} follow)")]
    private static partial void LogResync(ILogger logger, string reason, long lastId);

    [LoggerMessage(EventId = 2131, Level = LogLevel.Error, Message = "following the inventory's notifications ended: {Error}; every read goes to the database")]
    private static partial void LogFollowEnded(ILogger logger, string error);
}

/// <summary>The cached view's state, in daemon.status.</summary>
/// <param name="Trusted">Reads may be answered from the cache (the notification connection is up and re-read after its last reconnection).</param>
/// <param name="ListenerPid">The server process of the notification connection (0: down).</param>
/// <param name="Reconnects">Times the notification connection was made again.</param>
/// <param name="Resyncs">Times the view was re-read after a reconnection.</param>
/// <param name="Notices">Events received.</param>
/// <param name="LastEventId">The last event received.</param>
/// <param name="CacheHits">Reads answered from the cache.</param>
/// <param name="DatabaseReads">Reads that went to the database.</param>
/// <param name="LastError">Why the notification connection last failed.</param>
public sealed record ViewStatus(bool Trusted, int ListenerPid, int Reconnects, int Resyncs, long Notices, long LastEventId, long CacheHits, long DatabaseReads, string? LastError);
