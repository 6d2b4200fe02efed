namespace Kvm.Devices.Bus;

/// <summary>
/// A level-triggered line several devices share (PCI INTx): it is asserted while any source
/// asserts it, and drives the underlying line only when that changes.
/// </summary>
public sealed class SharedInterruptLine(IInterruptLine line)
{
    private readonly object _lock = new();
    private int _asserted;

    /// <summary>A source for one device.</summary>
    public IInterruptLine CreateSource() => new Source(this);

    private void Update(bool was, bool now)
    {
        if (was == now)
            return;
        _asserted += now ? 1 : -1;
        if (now && _asserted == 1)
            line.SetLevel(true);
        else if (!now && _asserted == 0)
            line.SetLevel(false);
    }

    private sealed class Source(SharedInterruptLine shared) : IInterruptLine
    {
        private bool _level;

        public void SetLevel(bool asserted)
        {
            lock (shared._lock)
            {
                shared.Update(_level, asserted);
                _level = asserted;
            }
        }
    }
}
