using Kvm.Rpc;

namespace Kvm.Cluster;

public sealed partial class Kvmd
{
    /// <summary>
    /// kvmd's RPC methods: vm.create, vm.start, vm.stop, vm.pause, vm.resume, vm.save, vm.checkpoint, vm.delete-checkpoint, vm.fork, vm.upgrade,
    /// vm.delete, vm.list, vm.show, vm.console, events.wait, hosts.list, disks.list, leases.list, daemon.status.
    /// </summary>
    public void Register(RpcDispatcher dispatcher)
    {
        var j = KvmdJson.Default;
        dispatcher.Add("vm.create", j.CreateVmRequest, j.VmInfo, async (r, _, c) => await CreateAsync(r, c).ConfigureAwait(false));
        dispatcher.Add("vm.start", j.StartVmRequest, j.VmInfo, async (r, _, c) => await StartAsync(r, c).ConfigureAwait(false));
        dispatcher.Add("vm.stop", j.StopVmRequest, j.VmStopped, async (r, _, c) => await StopAsync(r, c).ConfigureAwait(false));
        dispatcher.Add("vm.pause", j.VmNameRequest, j.VmInfo, async (r, _, c) => await PauseAsync(r.Name, c).ConfigureAwait(false));
        dispatcher.Add("vm.resume", j.VmNameRequest, j.VmInfo, async (r, _, c) => await ResumeAsync(r.Name, c).ConfigureAwait(false));
        dispatcher.Add("vm.save", j.SaveVmRequest, j.VmSaved, async (r, _, c) => await SaveAsync(r, c).ConfigureAwait(false));
        dispatcher.Add("vm.checkpoint", j.CheckpointVmRequest, j.VmCheckpointed, async (r, _, c) => await CheckpointAsync(r, c).ConfigureAwait(false));
        dispatcher.Add("vm.delete-checkpoint", j.DeleteCheckpointRequest, j.CheckpointDeleted, async (r, _, c) => await DeleteCheckpointAsync(r, c).ConfigureAwait(false));
        dispatcher.Add("vm.fork", j.ForkVmRequest, j.VmForked, async (r, _, c) => await ForkAsync(r, c).ConfigureAwait(false));
        dispatcher.Add("vm.upgrade", j.UpgradeVmRequest, j.VmUpgraded, async (r, _, c) => await UpgradeAsync(r, c).ConfigureAwait(false));
        dispatcher.Add("vm.delete", j.DeleteVmRequest, j.VmInfo, async (r, _, c) => await DeleteAsync(r, c).ConfigureAwait(false));
        dispatcher.Add("vm.list", j.VmList, async (_, c) => await ListAsync(c).ConfigureAwait(false));
        dispatcher.Add("vm.show", j.VmNameRequest, j.VmDetail, async (r, _, c) => await ShowAsync(r.Name, c).ConfigureAwait(false));
        dispatcher.Add("vm.console", j.VmNameRequest, j.ConsoleEndpoint, async (r, _, c) => await ConsoleAsync(r.Name, c).ConfigureAwait(false));
        dispatcher.Add("events.wait", j.EventsRequest, j.EventList, async (r, _, c) => await EventsAsync(r, c).ConfigureAwait(false));
        dispatcher.Add("hosts.list", j.HostList, async (_, c) => await HostsAsync(c).ConfigureAwait(false));
        dispatcher.Add("disks.list", j.DiskList, async (_, c) => await DisksAsync(c).ConfigureAwait(false));
        dispatcher.Add("leases.list", j.LeaseList, async (_, c) => await LeasesAsync(c).ConfigureAwait(false));
        dispatcher.Add("daemon.status", j.DaemonStatus, (_, _) => ValueTask.FromResult(Status()));
    }
}
