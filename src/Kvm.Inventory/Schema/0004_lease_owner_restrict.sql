-- Version 4: a host that holds a lease cannot be deleted.
--
-- Until now deleting a host row set its leases' owner_host to null and left their expiry, which
-- the lease's own check (no owner exactly when no expiry) refuses: the delete failed on a check
-- constraint that says nothing of why. A lease held by a host is that host's claim on a VM or a
-- disk; it must be released, or expire and be broken by another host, before the host goes.
-- Free leases keep no owner, so they never stand in the way.
alter table leases drop constraint leases_owner_host_fkey;
alter table leases add constraint leases_owner_host_fkey
    foreign key (owner_host) references hosts (id) on delete restrict;
