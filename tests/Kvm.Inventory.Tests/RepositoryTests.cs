using System.Text.Json;
using Dapper;
using Kvm.Inventory.Repositories;
using Kvm.Inventory.Schema;
using Kvm.Rpc;
using Npgsql;

namespace Kvm.Inventory.Tests;

/// <summary>The repositories on a migrated database of a real server: round trips, events, and the constraints' errors.</summary>
[Collection(ClusterCollection.Name)]
public sealed class RepositoryTests(ClusterFixture cluster)
{
    private const string Spec = """{"memory_mib": 512, "vcpus": 2, "disks": [{"path": "/var/lib/kvm/web1.qcow2"}]}""";

    private async Task<NpgsqlDataSource> MigratedAsync()
    {
        var (db, _) = await cluster.NewDatabaseAsync();
        await SchemaMigrator.ApplyAsync(db);
        return db;
    }

    [SkippableFact]
    public async Task Hosts_register_heartbeat_and_list_and_a_second_registration_updates_the_same_host()
    {
        var db = await MigratedAsync();
        var hosts = new HostRepository(db);
        var h1 = await hosts.RegisterAsync("host-1", "10.0.0.1");
        await hosts.RegisterAsync("host-0", "10.0.0.2");
        Assert.Equal("10.0.0.1", h1.Address);
        Assert.Equal(TimeSpan.Zero, h1.LastSeen.Offset);
        Assert.InRange(h1.LastSeen, DateTimeOffset.UtcNow.AddMinutes(-1), DateTimeOffset.UtcNow.AddMinutes(1));

        var again = await hosts.RegisterAsync("host-1", "10.0.0.9");
        Assert.Equal(h1.Id, again.Id);
        Assert.Equal("10.0.0.9", again.Address);

        var seen = await hosts.HeartbeatAsync(h1.Id);
        Assert.True(seen >= again.LastSeen);
        Assert.Equal(["host-0", "host-1"], (await hosts.ListAsync()).Select(h => h.Name));
        Assert.Equal(seen, (await hosts.FindAsync("host-1"))!.LastSeen);
        Assert.Null(await hosts.FindAsync("host-2"));

        var missing = Guid.NewGuid();
        var e = await Assert.ThrowsAsync<InventoryException>(() => hosts.HeartbeatAsync(missing));
        Assert.Equal(RpcErrorCode.NotFound, e.Code);
        Assert.Contains(missing.ToString(), e.Message);
        var bad = await Assert.ThrowsAsync<InventoryException>(() => hosts.RegisterAsync("no spaces", ""));
        Assert.Contains("host name 'no spaces' is not allowed", bad.Message);
    }

    [SkippableFact]
    public async Task A_VM_round_trips_through_create_get_list_state_changes_and_delete_with_an_event_for_each()
    {
        var db = await MigratedAsync();
        var host = await new HostRepository(db).RegisterAsync("host-1", "");
        var vms = new VmRepository(db);
        var events = new EventRepository(db);
        var before = (await events.ListSinceAsync(0)).Select(e => e.Id).DefaultIfEmpty(0).Max();

        var created = await vms.CreateAsync("web1", Spec, host.Id);
        Assert.Equal("web1", created.Name);
        Assert.Equal(VmDesiredState.Stopped, created.DesiredState);
        Assert.Equal(VmActualState.Stopped, created.ActualState);
        Assert.Equal(host.Id, created.OwnerHost);
        Assert.True(JsonElement.DeepEquals(JsonDocument.Parse(Spec).RootElement, JsonDocument.Parse(created.Spec).RootElement), created.Spec);
        await vms.CreateAsync("db1", "{}");

        Assert.Equal(created, await vms.GetAsync("web1"));
        Assert.Equal(["db1", "web1"], (await vms.ListAsync()).Select(v => v.Name));

        var desired = await vms.SetDesiredStateAsync("web1", VmDesiredState.Running);
        Assert.Equal(VmDesiredState.Running, desired.DesiredState);
        Assert.True(desired.UpdatedAt >= created.UpdatedAt);
        var actual = await vms.SetActualStateAsync("web1", VmActualState.Migrating);
        Assert.Equal((VmDesiredState.Running, VmActualState.Migrating), (actual.DesiredState, actual.ActualState));
        Assert.Equal(actual, await vms.GetAsync("web1"));

        await vms.DeleteAsync("web1");
        Assert.Null(await vms.FindAsync("web1"));
        var gone = await Assert.ThrowsAsync<InventoryException>(() => vms.GetAsync("web1"));
        Assert.Equal((RpcErrorCode.NotFound, "VM 'web1' does not exist"), (gone.Code, gone.Message));
        await Assert.ThrowsAsync<InventoryException>(() => vms.DeleteAsync("web1"));
        await Assert.ThrowsAsync<InventoryException>(() => vms.SetDesiredStateAsync("web1", VmDesiredState.Paused));

        var log = (await events.ListSinceAsync(before)).Where(e => e.Subject == "vm/web1").ToList();
        Assert.Equal(["vm.created", "vm.desired-state", "vm.actual-state", "vm.deleted"], log.Select(e => e.Kind));
        Assert.All(log, e => Assert.Equal(host.Id, e.Host));
        Assert.Equal("running", JsonDocument.Parse(log[1].Data).RootElement.GetProperty("state").GetString());
        Assert.Equal("migrating", JsonDocument.Parse(log[2].Data).RootElement.GetProperty("state").GetString());
    }

    [SkippableFact]
    public async Task A_duplicate_VM_name_is_an_AlreadyExists_error_naming_it_and_bad_input_names_what_is_wrong()
    {
        var db = await MigratedAsync();
        var vms = new VmRepository(db);
        await vms.CreateAsync("web1", Spec);

        var dup = await Assert.ThrowsAsync<InventoryException>(() => vms.CreateAsync("web1", "{}"));
        Assert.Equal(RpcErrorCode.AlreadyExists, dup.Code);
        Assert.Equal("a VM named 'web1' already exists", dup.Message);
        // The first VM is untouched.
        Assert.Contains("memory_mib", (await vms.GetAsync("web1")).Spec);

        var notJson = await Assert.ThrowsAsync<InventoryException>(() => vms.CreateAsync("web2", "{memory: 1"));
        Assert.Contains("the spec of VM 'web2' is not valid JSON", notJson.Message);
        var notObject = await Assert.ThrowsAsync<InventoryException>(() => vms.CreateAsync("web2", "[1, 2]"));
        Assert.Equal("the spec of VM 'web2' is not a JSON object", notObject.Message);
        var badName = await Assert.ThrowsAsync<InventoryException>(() => vms.CreateAsync("../etc", "{}"));
        Assert.Contains("VM name '../etc' is not allowed", badName.Message);
        var noHost = Guid.NewGuid();
        var orphan = await Assert.ThrowsAsync<InventoryException>(() => vms.CreateAsync("web2", "{}", noHost));
        Assert.Equal((RpcErrorCode.NotFound, $"host {noHost} does not exist"), (orphan.Code, orphan.Message));
        Assert.Equal(["web1"], (await vms.ListAsync()).Select(v => v.Name));
    }

    /// <summary>InventoryNames says of a name what the schema's check constraints on vms.name and hosts.name say.</summary>
    [SkippableFact]
    public async Task The_name_rule_agrees_with_the_schemas_constraints()
    {
        var db = await MigratedAsync();
        var hosts = new HostRepository(db);
        var vms = new VmRepository(db);
        string[] names =
        [
            "a", "Z", "7", "web-1.x_y", "a..", new string('a', 63), new string('a', 64), "", "-a", ".a", "_a", "a/b", "a b", "../etc",
            "\u00e9t\u00e9", "a\u00e9", "\uff21", "a\n", "\na", "a\u0000", "a\t", "a$", "a%", "A-", "\u0661",
        ];
        foreach (string name in names)
        {
            bool vm = await Accepted(() => vms.CreateAsync(name, "{}"));
            bool host = await Accepted(() => hosts.RegisterAsync(name, ""));
            Assert.True(vm == InventoryNames.IsValid(name) && host == vm,
                $"name '{Uri.EscapeDataString(name)}': the VM table {(vm ? "accepts" : "refuses")} it, the host table {(host ? "accepts" : "refuses")} it, InventoryNames says {(InventoryNames.IsValid(name) ? "valid" : "invalid")}");
        }

        // A long name is quoted short, with its length.
        var refused = await Assert.ThrowsAsync<InventoryException>(() => vms.CreateAsync(new string('x', 100_000), "{}"));
        Assert.Equal(RpcErrorCode.InvalidParams, refused.Code);
        Assert.Contains("(100000 characters) is not allowed", refused.Message, StringComparison.Ordinal);
        Assert.True(refused.Message.Length < 300, refused.Message);

        static async Task<bool> Accepted(Func<Task> create)
        {
            try
            {
                await create();
                return true;
            }
            catch (InventoryException)
            {
                return false;
            }
        }
    }

    [SkippableFact]
    public async Task Events_append_and_list_after_an_id_in_order_with_a_limit()
    {
        var db = await MigratedAsync();
        var events = new EventRepository(db);
        var a = await events.AppendAsync("disk.created", "disk/1", """{"size": 1048576}""");
        var b = await events.AppendAsync("disk.deleted", "disk/1");
        var c = await events.AppendAsync("note", "host/h1");
        Assert.True(a.Id < b.Id && b.Id < c.Id);
        Assert.Equal(1048576, JsonDocument.Parse(a.Data).RootElement.GetProperty("size").GetInt32());
        Assert.Equal("{}", b.Data);

        Assert.Equal([b, c], await events.ListSinceAsync(a.Id));
        Assert.Equal([a, b], await events.ListSinceAsync(a.Id - 1, limit: 2));
        Assert.Empty(await events.ListSinceAsync(c.Id));

        var badKind = await Assert.ThrowsAsync<InventoryException>(() => events.AppendAsync("Not A Kind", "vm/x"));
        Assert.Contains("event kind 'Not A Kind' is not allowed", badKind.Message);
        var badData = await Assert.ThrowsAsync<InventoryException>(() => events.AppendAsync("note", "vm/x", "{"));
        Assert.Contains("the data of event 'note' of vm/x is not valid JSON", badData.Message);
    }

    [SkippableFact]
    public async Task Schema_constraints_refuse_bad_states_modes_and_conflicting_disk_reservations()
    {
        var db = await MigratedAsync();
        var host = await new HostRepository(db).RegisterAsync("host-1", "");
        var vm1 = await new VmRepository(db).CreateAsync("vm1", "{}");
        var vm2 = await new VmRepository(db).CreateAsync("vm2", "{}");
        await using var conn = await db.OpenConnectionAsync();

        var state = await Assert.ThrowsAsync<PostgresException>(() => conn.ExecuteAsync("update vms set actual_state = 'exploded' where name = 'vm1'"));
        Assert.Equal("vms_actual_state_check", state.ConstraintName);

        var disk = await conn.ExecuteScalarAsync<Guid>("insert into disks (path, format, size_bytes) values ('/d/a.qcow2', 'qcow2', 1) returning id");
        var mode = await Assert.ThrowsAsync<PostgresException>(() => conn.ExecuteAsync(
            "insert into reservations (disk, holder_host, holder_vm, mode) values (@disk, @h, @v, 'sometimes')", new { disk, h = host.Id, v = vm1.Id }));
        Assert.Equal("reservations_mode_check", mode.ConstraintName);

        // Shared with shared: allowed. Exclusive with anything: refused by the trigger.
        const string Reserve = "insert into reservations (disk, holder_host, holder_vm, mode) values (@disk, @h, @v, @mode)";
        await conn.ExecuteAsync(Reserve, new { disk, h = host.Id, v = vm1.Id, mode = "shared" });
        await conn.ExecuteAsync(Reserve, new { disk, h = host.Id, v = vm2.Id, mode = "shared" });
        var exclusive = await Assert.ThrowsAsync<PostgresException>(() => conn.ExecuteAsync(Reserve, new { disk, h = host.Id, v = (Guid?)null, mode = "exclusive" }));
        Assert.Equal(("23P01", "reservations_modes"), (exclusive.SqlState, exclusive.ConstraintName));
        Assert.Contains("is already reserved shared and cannot be reserved exclusive", exclusive.MessageText);

        var lease = await Assert.ThrowsAsync<PostgresException>(() => conn.ExecuteAsync(
            "insert into leases (resource_kind, resource_id, owner_host) values ('vm', @id, @h)", new { id = vm1.Id, h = host.Id }));
        Assert.Equal("leases_check", lease.ConstraintName); // an owner without an expiry
    }
}
