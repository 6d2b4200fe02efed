using Kvm.Vmm.Snapshot;
using Microsoft.Extensions.Logging;

namespace Kvm.Vmm.Machine;

/// <summary>How a VM comes to be: booted from a spec, or restored from a snapshot.</summary>
public abstract record VmLaunch
{
    /// <summary>The machine's spec (for a restore, the saved one with the restore's changes).</summary>
    public abstract VmSpec Spec { get; }

    /// <summary>Builds the machine, ready to <see cref="VirtualMachine.Start"/>.</summary>
    public abstract VirtualMachine Create(Action<ReadOnlySpan<byte>> serialOutput, ILogger? logger);

    public static implicit operator VmLaunch(VmSpec spec) => new BootLaunch(spec);
}

/// <summary>A VM booted from its spec's kernel.</summary>
public sealed record BootLaunch(VmSpec BootSpec) : VmLaunch
{
    public override VmSpec Spec => BootSpec;

    public override VirtualMachine Create(Action<ReadOnlySpan<byte>> serialOutput, ILogger? logger) =>
        VirtualMachine.Create(BootSpec, serialOutput, logger: logger);
}

/// <summary>
/// A VM restored from the snapshot in <see cref="Directory"/>; made by <see cref="Open"/>, which
/// reads and checks the state file first, so a bad snapshot is refused before anything else.
/// </summary>
public sealed record RestoreLaunch : VmLaunch
{
    private RestoreLaunch(string directory, SnapshotState state, VmSpec spec, RestoreOptions options)
    {
        Directory = directory;
        State = state;
        RestoredSpec = spec;
        Options = options;
    }

    public string Directory { get; }
    public SnapshotState State { get; }
    public RestoreOptions Options { get; }
    private VmSpec RestoredSpec { get; }

    public override VmSpec Spec => RestoredSpec;

    /// <summary>Reads the snapshot's state file (<see cref="SnapshotFormatException"/> if it is refused) and the spec in it.</summary>
    public static RestoreLaunch Open(string directory, RestoreOptions? options = null)
    {
        options ??= new RestoreOptions();
        options.Clock?.Mark("start-up");
        var state = SnapshotReader.Read(directory);
        var spec = VmSnapshot.SpecOf(state, directory);
        if (options.ChangeSpec is { } change)
            spec = change(spec);
        spec.Validate();
        options.Clock?.Mark("read the state file and its spec");
        return new RestoreLaunch(directory, state, spec, options);
    }

    /// <summary>Restores the VM; with a <see cref="RestoreOptions.Clock"/>, logs where the time went.</summary>
    public override VirtualMachine Create(Action<ReadOnlySpan<byte>> serialOutput, ILogger? logger)
    {
        var vm = VmSnapshot.Restore(Directory, State, RestoredSpec, serialOutput, Options, logger: logger);
        if (Options.Clock is { } clock && logger is not null)
            VmmLog.Restored(logger, Directory, Options.Memory.ToString().ToLowerInvariant(), clock.TotalMilliseconds, clock.Describe());
        return vm;
    }
}

/// <summary>
/// A fork of the snapshot in <see cref="Template"/> with its files in <see cref="Directory"/>
/// (<see cref="VmFork"/>): made by <see cref="Open"/>, which reads and checks the template first.
/// </summary>
public sealed record ForkLaunch : VmLaunch
{
    private ForkLaunch(string template, SnapshotState state, string? directory, VmSpec spec)
    {
        Template = template;
        State = state;
        Directory = directory;
        ForkSpec = spec;
    }

    public string Template { get; }
    private SnapshotState State { get; }

    /// <summary>Where the fork's disks are made; null when the fork's spec was given (its disks exist).</summary>
    public string? Directory { get; }
    private VmSpec ForkSpec { get; }

    /// <summary>The template's spec, or the fork's when given; the fork's disks and MACs are its own (the machine's spec says which).</summary>
    public override VmSpec Spec => ForkSpec;

    /// <summary>Reads the template's state file (<see cref="SnapshotFormatException"/> if it is refused) and the spec in it.</summary>
    public static ForkLaunch Open(string template, string directory)
    {
        var state = SnapshotReader.Read(template);
        var spec = VmSnapshot.SpecOf(state, template);
        spec.Validate();
        return new ForkLaunch(template, state, directory, spec);
    }

    /// <summary>A fork onto the machine <paramref name="spec"/> describes (<see cref="VmFork.Prepare"/> made its disks), refused at once if it does not fit the template.</summary>
    public static ForkLaunch OpenWithSpec(string template, VmSpec spec)
    {
        var state = SnapshotReader.Read(template);
        VmFork.CheckSpec(template, state, spec);
        return new ForkLaunch(template, state, null, spec);
    }

    public override VirtualMachine Create(Action<ReadOnlySpan<byte>> serialOutput, ILogger? logger) =>
        Directory is null
            ? VmFork.RestoreWithSpec(Template, State, ForkSpec, serialOutput, logger: logger)
            : VmFork.Restore(Template, State, Directory, serialOutput, logger: logger).Vm;
}
