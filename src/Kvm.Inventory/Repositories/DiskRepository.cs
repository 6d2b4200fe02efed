using Dapper;
using Kvm.Rpc;
using Npgsql;

namespace Kvm.Inventory.Repositories;

/// <summary>
/// The disk images the inventory knows, by id and by path, and their backing chains. Who uses a
/// disk is in <see cref="ReservationRepository"/>; a reserved disk cannot be deleted.
/// </summary>
public sealed class DiskRepository(NpgsqlDataSource db)
{
    private const string Columns = "id, path, format, size_bytes, backing, host, created_at";

    /// <summary>
    /// Registers the image at <paramref name="path"/> (absolute), of <paramref name="sizeBytes"/>
    /// virtual size, over <paramref name="backing"/> (a registered disk), living on
    /// <paramref name="host"/> (null: storage every host reaches). A path already registered is an
    /// AlreadyExists error.
    /// </summary>
    public Task<DiskRow> RegisterAsync(string path, DiskFormat format, long sizeBytes, Guid? backing = null, Guid? host = null, CancellationToken ct = default)
    {
        var f = StateNames.Of(format);
        return DbErrors.Run($"register disk '{path}'", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var row = await conn.QuerySingleAsync<DiskRecord>($"""
                with d as (
                    insert into disks (path, format, size_bytes, backing, host) values (@path, @f, @sizeBytes, @backing, @host)
                    returning {Columns}),
                e as (
                    insert into events (kind, subject, host, data)
                    select 'disk.registered', 'disk/' || d.id, d.host,
                           jsonb_build_object('path', d.path, 'format', d.format, 'size_bytes', d.size_bytes, 'backing', d.backing) from d)
                select {Columns} from d
                """, new { path, f, sizeBytes, backing, host }).ConfigureAwait(false);
            return row.ToRow();
        }, e => (e.SqlState, e.ConstraintName) switch
        {
            (DbErrors.UniqueViolation, "disks_path_key") => new InventoryException($"a disk at '{path}' is already registered", e, RpcErrorCode.AlreadyExists),
            (DbErrors.CheckViolation, "disks_path_check") => new InventoryException($"disk path '{path}' is not absolute", e, RpcErrorCode.InvalidParams),
            (DbErrors.CheckViolation, "disks_size_bytes_check") => new InventoryException($"disk size {sizeBytes} of '{path}' is negative", e, RpcErrorCode.InvalidParams),
            (DbErrors.ForeignKeyViolation, "disks_backing_fkey") => new InventoryException($"backing disk {backing} of '{path}' does not exist", e, RpcErrorCode.NotFound),
            (DbErrors.ForeignKeyViolation, "disks_host_fkey") => new InventoryException($"host {host} of disk '{path}' does not exist", e, RpcErrorCode.NotFound),
            _ => null,
        });
    }

    /// <summary>Disk <paramref name="id"/>, or null.</summary>
    public Task<DiskRow?> FindAsync(Guid id, CancellationToken ct = default) =>
        DbErrors.Run($"read disk {id}", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var row = await conn.QuerySingleOrDefaultAsync<DiskRecord>($"select {Columns} from disks where id = @id", new { id }).ConfigureAwait(false);
            return row?.ToRow();
        });

    /// <summary>The disk registered at <paramref name="path"/>, or null.</summary>
    public Task<DiskRow?> FindByPathAsync(string path, CancellationToken ct = default) =>
        DbErrors.Run($"read disk '{path}'", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var row = await conn.QuerySingleOrDefaultAsync<DiskRecord>($"select {Columns} from disks where path = @path", new { path }).ConfigureAwait(false);
            return row?.ToRow();
        });

    /// <summary>Every disk, by path.</summary>
    public Task<IReadOnlyList<DiskRow>> ListAsync(CancellationToken ct = default) =>
        DbErrors.Run("list disks", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var rows = await conn.QueryAsync<DiskRecord>($"select {Columns} from disks order by path").ConfigureAwait(false);
            return (IReadOnlyList<DiskRow>)rows.Select(r => r.ToRow()).ToList();
        });

    /// <summary>The backing chain of disk <paramref name="top"/>: itself first, then each backing image; a NotFound error when it does not exist.</summary>
    public Task<IReadOnlyList<DiskRow>> ChainAsync(Guid top, CancellationToken ct = default) =>
        DbErrors.Run($"read the backing chain of disk {top}", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            var chain = await ChainAsync(conn, null, top).ConfigureAwait(false);
            return chain.Count > 0 ? chain : throw DbErrors.NotFound($"disk {top}");
        });

    internal static async Task<IReadOnlyList<DiskRow>> ChainAsync(NpgsqlConnection conn, NpgsqlTransaction? tx, Guid top)
    {
        // Backing is set when a disk is registered, to a disk that exists: there are no cycles.
        // The depth limit only keeps a damaged table from looping.
        var rows = await conn.QueryAsync<DiskRecord>($"""
            with recursive c as (
                select {Columns}, 0 as depth from disks where id = @top
                union all
                select d.id, d.path, d.format, d.size_bytes, d.backing, d.host, d.created_at, c.depth + 1
                from disks d join c on d.id = c.backing where c.depth < 1000)
            select {Columns} from c order by depth
            """, new { top }, tx).ConfigureAwait(false);
        return rows.Select(r => r.ToRow()).ToList();
    }

    /// <summary>
    /// Deletes disk <paramref name="id"/> from the inventory (not the file). Refused (InvalidState)
    /// while it is reserved, naming the holders, or while another disk uses it as its backing image.
    /// </summary>
    public Task DeleteAsync(Guid id, CancellationToken ct = default) =>
        DbErrors.Run($"delete disk {id}", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            await using var tx = await conn.BeginTransactionAsync(ct).ConfigureAwait(false);
            // The row lock makes a reservation in progress finish first (its trigger locks the
            // disk's row too), so the check below sees it.
            var path = await conn.ExecuteScalarAsync<string?>("select path from disks where id = @id for update", new { id }, tx).ConfigureAwait(false)
                ?? throw DbErrors.NotFound($"disk {id}");
            var holders = await ReservationRepository.ListAsync(conn, tx, id).ConfigureAwait(false);
            if (holders.Count > 0)
                throw new InventoryException(
                    $"disk '{path}' is reserved by {string.Join(", ", holders.Select(h => $"{h.Holder} ({StateNames.Of(h.Mode)})"))}: it cannot be deleted until released",
                    code: RpcErrorCode.InvalidState);
            var children = (await conn.QueryAsync<string>("select path from disks where backing = @id order by path", new { id }, tx).ConfigureAwait(false)).ToList();
            if (children.Count > 0)
                throw new InventoryException($"disk '{path}' is the backing image of {string.Join(", ", children.Select(c => $"'{c}'"))}: it cannot be deleted",
                    code: RpcErrorCode.InvalidState);
            await conn.ExecuteAsync("""
                with d as (delete from disks where id = @id returning id, path, host)
                insert into events (kind, subject, host, data)
                select 'disk.deleted', 'disk/' || d.id, d.host, jsonb_build_object('path', d.path) from d
                """, new { id }, tx).ConfigureAwait(false);
            await tx.CommitAsync(ct).ConfigureAwait(false);
            return true;
        });

    /// <summary>
    /// Records that disk <paramref name="id"/>'s image was folded into the images it backed and is
    /// gone (a checkpoint deleted: its frozen layer merged into the next): each disk it backed is
    /// backed by its backing image now, its reservations end and its row goes, in one transaction.
    /// Records 'disk.folded'. Returns the paths of the disks it backed.
    /// </summary>
    public Task<IReadOnlyList<string>> ForgetFoldedAsync(Guid id, CancellationToken ct = default) =>
        DbErrors.Run($"forget folded disk {id}", async () =>
        {
            await using var conn = await db.OpenConnectionAsync(ct).ConfigureAwait(false);
            await using var tx = await conn.BeginTransactionAsync(ct).ConfigureAwait(false);
            var row = await conn.QuerySingleOrDefaultAsync<DiskRecord>($"select {Columns} from disks where id = @id for update", new { id }, tx).ConfigureAwait(false)
                ?? throw DbErrors.NotFound($"disk {id}");
            var children = (await conn.QueryAsync<string>("update disks set backing = @backing where backing = @id returning path",
                new { id, backing = row.Backing }, tx).ConfigureAwait(false)).Order(StringComparer.Ordinal).ToArray();
            await conn.ExecuteAsync("delete from reservations where disk = @id", new { id }, tx).ConfigureAwait(false);
            // The paths as a JSON array made here: an array parameter is not one Dapper.AOT binds.
            string into = "[" + string.Join(",", children.Select(c => "\"" + System.Text.Encodings.Web.JavaScriptEncoder.UnsafeRelaxedJsonEscaping.Encode(c) + "\"")) + "]";
            await conn.ExecuteAsync("""
                with d as (delete from disks where id = @id returning id, path, host)
                insert into events (kind, subject, host, data)
                select 'disk.folded', 'disk/' || d.id, d.host, jsonb_build_object('path', d.path, 'into', @into::jsonb) from d
                """, new { id, into }, tx).ConfigureAwait(false);
            await tx.CommitAsync(ct).ConfigureAwait(false);
            return (IReadOnlyList<string>)children;
        });

    /// <summary>A disks row as Npgsql reads it.</summary>
    internal sealed record DiskRecord(Guid Id, string Path, string Format, long SizeBytes, Guid? Backing, Guid? Host, DateTime CreatedAt)
    {
        public DiskRow ToRow() => new(Id, Path, StateNames.Format(Format), SizeBytes, Backing, Host, Times.Utc(CreatedAt));
    }
}
