-- Schema v2: what lease events name, reservations tied to the lease they were made under, and a
-- notification for every event (LISTEN kvm_events).

-- The subject of an event about a lease: 'vm/<name>', 'disk/<id>' or 'host/<name>'; null when the
-- resource does not exist.
create function lease_subject(kind text, resource uuid) returns text language sql stable as $$
    select case $1
        when 'vm' then (select 'vm/' || v.name from vms v where v.id = $2)
        when 'disk' then (select 'disk/' || d.id from disks d where d.id = $2)
        when 'host' then (select 'host/' || h.name from hosts h where h.id = $2)
    end
$$;

-- The lease a reservation was made under (its generation is lease_generation, from v1): while
-- that lease is held at that generation and unexpired, nobody may break the reservation.
alter table reservations
    add column lease_kind     text check (lease_kind in ('vm', 'disk', 'host')),
    add column lease_resource uuid,
    add constraint reservations_lease_check
        check ((lease_kind is null) = (lease_resource is null) and (lease_kind is null or lease_generation is not null));
create index reservations_holder_host on reservations (holder_host, holder_vm);

-- Every event is announced on channel kvm_events, at its commit, with a small JSON payload (id,
-- kind, subject, host: well under NOTIFY's 8000-byte limit). The row stays the data: a listener
-- reads the events after the last id it has, so a notification lost with a connection loses
-- nothing.
create function events_notify() returns trigger language plpgsql as $$
begin
    perform pg_notify('kvm_events', json_build_object(
        'id', new.id, 'kind', left(new.kind, 100), 'subject', left(new.subject, 200), 'host', new.host)::text);
    return null;
end
$$;
create trigger events_notify after insert on events
    for each row execute function events_notify();
