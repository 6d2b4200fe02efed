-- Version 3: a VM stopped by its host's fence, and a VM's restart policy.
--
-- 'fenced': the VM's host stopped it because it could not keep the VM's lease (frozen, cut off
-- from the database). The VM is still wanted (its desired state stays): any host may start it
-- again once it holds the lease, the same host included once it can renew again.
alter table vms drop constraint vms_actual_state_check;
alter table vms add constraint vms_actual_state_check
    check (actual_state in ('stopped', 'starting', 'running', 'paused', 'stopping', 'migrating', 'failed', 'unknown', 'fenced'));

-- What kvmd does when the VM ends without being asked to: 'no' (it stays down), 'on-failure'
-- (started again after a crash or a failure status), 'always' (also after the guest powers off).
alter table vms add column restart_policy text not null default 'no'
    check (restart_policy in ('no', 'on-failure', 'always'));
