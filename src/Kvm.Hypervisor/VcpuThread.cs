using Kvm.Interop.Native;

namespace Kvm.Hypervisor;

/// <summary>The run state of a vCPU thread.</summary>
public enum VcpuRunState
{
    Created,
    Running,
    Paused,
    Stopped,
}

/// <summary>What the exit handler wants the vCPU thread to do next.</summary>
public enum VcpuAction
{
    Continue,
    Stop,
}

/// <summary>
/// A thread that runs one vCPU. Other threads pause, resume and stop it: they set a request,
/// set kvm_run.immediate_exit and send the thread a signal, so KVM_RUN returns -EINTR wherever the
/// thread is. The thread clears immediate_exit before it looks at requests, so no kick is lost.
/// </summary>
public sealed class VcpuThread
{
    private static readonly Lazy<int> KickSignal = new(() => Errno.Check(KvmShim.KickInit(), "sigaction(kick signal)"));

    private readonly KvmVcpu _vcpu;
    private readonly Func<KvmVcpu, VcpuAction> _onExit;
    private readonly Thread _thread;
    private readonly object _gate = new();
    private VcpuRunState _state = VcpuRunState.Created;
    private bool _pauseRequested;
    private bool _stopRequested;
    private bool _threadAlive;
    private bool _exitPending;      // the last KVM_RUN exited to user space; the next entry completes it
    private ulong _pthread;

    /// <param name="vcpu">The vCPU to run.</param>
    /// <param name="onExit">Called on the vCPU thread after every exit to user space.</param>
    public VcpuThread(KvmVcpu vcpu, Func<KvmVcpu, VcpuAction> onExit)
    {
        _vcpu = vcpu;
        _onExit = onExit;
        _ = KickSignal.Value;
        _thread = new Thread(Loop) { Name = $"vcpu{vcpu.Id}", IsBackground = true };
    }

    public KvmVcpu Vcpu => _vcpu;

    public VcpuRunState State
    {
        get { lock (_gate) return _state; }
    }

    /// <summary>The exception that stopped the thread, if one did.</summary>
    public Exception? Fault { get; private set; }

    /// <summary>Raised on the vCPU thread whenever the state changes.</summary>
    public event Action<VcpuThread, VcpuRunState>? StateChanged;

    /// <summary>Starts the thread; with <paramref name="paused"/> it waits for <see cref="Resume"/> first.</summary>
    public void Start(bool paused = false)
    {
        lock (_gate)
        {
            if (_state != VcpuRunState.Created)
                throw new InvalidOperationException($"vCPU {_vcpu.Id} was already started");
            _pauseRequested = paused;
            _threadAlive = true;
        }
        _thread.Start();
    }

    /// <summary>Asks the vCPU to pause and waits until it has (or has stopped).</summary>
    public void Pause(TimeSpan? timeout = null)
    {
        lock (_gate)
        {
            _pauseRequested = true;
            if (!_threadAlive)
                return; // not started yet (it will start paused) or already stopped
            KickLocked();
            var deadline = timeout is null ? DateTime.MaxValue : DateTime.UtcNow + timeout.Value;
            while (_state is not (VcpuRunState.Paused or VcpuRunState.Stopped))
            {
                if (timeout is null)
                    Monitor.Wait(_gate);
                else if (!Monitor.Wait(_gate, Max(deadline - DateTime.UtcNow)))
                    throw new TimeoutException($"vCPU {_vcpu.Id} did not pause within {timeout}");
            }
        }
    }

    public void Resume()
    {
        lock (_gate)
        {
            _pauseRequested = false;
            Monitor.PulseAll(_gate);
        }
    }

    /// <summary>Asks the vCPU thread to stop; safe to call from any thread, including the vCPU's own.</summary>
    public void RequestStop()
    {
        lock (_gate)
        {
            _stopRequested = true;
            Monitor.PulseAll(_gate);
            KickLocked();
        }
    }

    /// <summary>Waits for the thread to end; false on timeout.</summary>
    public bool Join(TimeSpan timeout)
    {
        if (_thread.ThreadState.HasFlag(ThreadState.Unstarted))
            return true;
        return _thread.Join(timeout);
    }

    private static TimeSpan Max(TimeSpan t) => t < TimeSpan.Zero ? TimeSpan.Zero : t;

    // Called with _gate held: make KVM_RUN return now or at its next entry.
    private void KickLocked()
    {
        if (!_threadAlive)
            return;
        _vcpu.SetImmediateExit(true);
        if (_pthread != 0)
            KvmShim.Kick(_pthread, KickSignal.Value);
    }

    // Called with _gate held; returns whether the state changed. The caller raises StateChanged
    // after releasing the lock, so handlers may look at other vCPUs without lock-order cycles.
    private bool SetState(VcpuRunState s)
    {
        if (_state == s)
            return false;
        _state = s;
        Monitor.PulseAll(_gate);
        return true;
    }

    private void Raise(VcpuRunState s) => StateChanged?.Invoke(this, s);

    /// <summary>
    /// Lets KVM finish the exit user space just handled (the data of a port or MMIO read goes into
    /// the registers only at the next KVM_RUN) without running guest code: KVM_RUN with
    /// immediate_exit set completes it and returns -EINTR. A paused vCPU is then whole, so its
    /// state can be saved (<see cref="VcpuState"/>).
    /// </summary>
    private void CompletePendingExit()
    {
        _exitPending = false;
        _vcpu.SetImmediateExit(true);
        int rc = _vcpu.Run();
        if (rc < 0 && rc != -Errno.EINTR && rc != -Errno.EAGAIN)
            throw new HypervisorException($"vCPU {_vcpu.Id}: KVM_RUN to complete the last exit failed", new KvmIoctlException("KVM_RUN", -rc));
    }

    private void Loop()
    {
        lock (_gate)
            _pthread = KvmShim.ThreadSelf();
        try
        {
            while (true)
            {
                if (_vcpu.ImmediateExit)
                    _vcpu.SetImmediateExit(false);
                bool stop;
                bool running = false;
                lock (_gate)
                {
                    while (_pauseRequested && !_stopRequested)
                    {
                        if (_exitPending)
                        {
                            CompletePendingExit();
                            continue;
                        }
                        if (SetState(VcpuRunState.Paused))
                        {
                            // Tell listeners outside the lock, then look at the requests again.
                            Monitor.Exit(_gate);
                            try { Raise(VcpuRunState.Paused); }
                            finally { Monitor.Enter(_gate); }
                            continue;
                        }
                        Monitor.Wait(_gate);
                    }
                    stop = _stopRequested;
                    if (!stop)
                        running = SetState(VcpuRunState.Running);
                }
                if (stop)
                    break;
                if (running)
                    Raise(VcpuRunState.Running);

                int rc = _vcpu.Run();
                if (rc == -Errno.EINTR || rc == -Errno.EAGAIN)
                {
                    _exitPending = false;   // KVM completed the last exit before it looked at immediate_exit
                    continue;
                }
                if (rc < 0)
                    throw new HypervisorException($"vCPU {_vcpu.Id}: KVM_RUN failed", new KvmIoctlException("KVM_RUN", -rc));
                _exitPending = true;
                if (_onExit(_vcpu) == VcpuAction.Stop)
                    break;
            }
        }
        catch (Exception e)
        {
            Fault = e;
        }
        finally
        {
            bool changed;
            lock (_gate)
            {
                _threadAlive = false;
                changed = SetState(VcpuRunState.Stopped);
            }
            if (changed)
                Raise(VcpuRunState.Stopped);
        }
    }
}
