namespace Kvm.Vmm.Boot;

/// <summary>A kernel image could not be loaded: the message names the file, the field and the value.</summary>
public sealed class BootException : Exception
{
    public BootException(string message) : base(message) { }
    public BootException(string message, Exception inner) : base(message, inner) { }
}
