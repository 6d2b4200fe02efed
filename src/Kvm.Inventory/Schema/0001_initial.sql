-- Schema v1 of the inventory: hosts, VMs, disks, leases, disk reservations and events.
-- Applied once, in one transaction, by SchemaMigrator; never edited after release: a change is a
-- new file (0002_...).

-- A host running kvmd. last_seen is its heartbeat; other hosts judge its liveness by it.
create table hosts (
    id            uuid        primary key default gen_random_uuid(),
    name          text        not null unique check (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    address       text        not null default '',
    registered_at timestamptz not null default now(),
    last_seen     timestamptz not null default now()
);

-- A VM: its spec (the VmSpec record as JSON), what the user wants (desired_state) and what its
-- owner host last saw (actual_state). owner_host is the host that runs it, or null; it holds the
-- VM only while it holds the VM's lease (leases, below).
create table vms (
    id            uuid        primary key default gen_random_uuid(),
    name          text        not null unique check (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$'),
    spec          jsonb       not null check (jsonb_typeof(spec) = 'object'),
    desired_state text        not null default 'stopped'
                  check (desired_state in ('stopped', 'running', 'paused')),
    actual_state  text        not null default 'stopped'
                  check (actual_state in ('stopped', 'starting', 'running', 'paused', 'stopping', 'migrating', 'failed', 'unknown')),
    owner_host    uuid        references hosts (id) on delete restrict,
    created_at    timestamptz not null default now(),
    updated_at    timestamptz not null default now()
);
create index vms_owner_host on vms (owner_host) where owner_host is not null;

-- A disk image. backing is the image below it in a backing chain; host is where the file lives
-- (null: storage every host reaches).
create table disks (
    id         uuid        primary key default gen_random_uuid(),
    path       text        not null unique check (path like '/%'),
    format     text        not null check (format in ('qcow2', 'raw')),
    size_bytes bigint      not null check (size_bytes >= 0),
    backing    uuid        references disks (id) on delete restrict check (backing <> id),
    host       uuid        references hosts (id) on delete restrict,
    created_at timestamptz not null default now()
);

-- A lease on a resource (a VM, a disk, ...): held by owner_host until expires_at, renewable. The
-- row outlives its holders: generation grows by one at every acquisition and never goes back, so
-- it is a fencing token: a write made under a lease carries the generation it was acquired with,
-- and is refused once the lease has moved on. A free lease has no owner and no expiry.
create table leases (
    resource_kind text        not null check (resource_kind in ('vm', 'disk', 'host')),
    resource_id   uuid        not null,
    owner_host    uuid        references hosts (id) on delete set null,
    expires_at    timestamptz,
    generation    bigint      not null default 0 check (generation >= 0),
    acquired_at   timestamptz,
    primary key (resource_kind, resource_id),
    check ((owner_host is null) = (expires_at is null))
);
create index leases_owner_host on leases (owner_host) where owner_host is not null;

-- Who uses a disk, and how: a writable disk exclusively (one holder, no one else), a read-only
-- one or a backing image shared (any number of shared holders, no exclusive one). The holder is a
-- VM on a host, or a host itself (a migration or a commit in progress); lease_generation is the
-- generation of the holder's lease when it reserved.
create table reservations (
    id               bigint      generated always as identity primary key,
    disk             uuid        not null references disks (id) on delete cascade,
    holder_host      uuid        not null references hosts (id) on delete cascade,
    holder_vm        uuid        references vms (id) on delete cascade,
    mode             text        not null check (mode in ('exclusive', 'shared')),
    lease_generation bigint,
    created_at       timestamptz not null default now()
);
create unique index reservations_holder on reservations (disk, holder_host, coalesce(holder_vm, '00000000-0000-0000-0000-000000000000'::uuid));
create unique index reservations_one_exclusive on reservations (disk) where mode = 'exclusive';

-- An exclusive reservation excludes every other one of the same disk, a shared one only exclusive
-- ones. Checked under a lock of the disk's row, so two concurrent reservations of one disk are
-- decided one after the other.
create function reservations_check() returns trigger language plpgsql as $$
begin
    perform 1 from disks where id = new.disk for update;
    if exists (select 1 from reservations r
               where r.disk = new.disk and r.id <> new.id
                 and (new.mode = 'exclusive' or r.mode = 'exclusive')) then
        raise exception 'disk % is already reserved % and cannot be reserved %', new.disk,
            (select string_agg(distinct r.mode, ', ') from reservations r where r.disk = new.disk and r.id <> new.id),
            new.mode
            using errcode = 'exclusion_violation', table = 'reservations', constraint = 'reservations_modes';
    end if;
    return new;
end
$$;
create trigger reservations_check before insert or update on reservations
    for each row execute function reservations_check();

-- What happened, in order: id grows (a reader resumes after the last id it saw). subject names
-- the object ('vm/web1', 'host/h1', 'disk/<id>'); data holds the details.
create table events (
    id      bigint      generated always as identity primary key,
    at      timestamptz not null default now(),
    kind    text        not null check (kind ~ '^[a-z][a-z0-9_.-]*$'),
    subject text        not null,
    host    uuid        references hosts (id) on delete set null,
    data    jsonb       not null default '{}'::jsonb
);
create index events_subject on events (subject, id);
