namespace Kvm.Hypervisor;

/// <summary>
/// A failure in the hypervisor layer, worded for the user: what failed and with which values.
/// The underlying ioctl failure, if any, is the inner exception.
/// </summary>
public class HypervisorException : Exception
{
    public HypervisorException(string message) : base(message) { }
    public HypervisorException(string message, Exception inner) : base(message, inner) { }
}
