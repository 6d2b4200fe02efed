namespace Kvm.Interop.Structs;

/// <summary>KVM_CAP_* numbers this project asks about (linux/kvm.h; never renumbered).</summary>
public enum KvmCap
{
    Irqchip = 0,
    Hlt = 1,
    UserMemory = 3,
    SetTssAddr = 4,
    ExtCpuid = 7,
    NrVcpus = 9,
    NrMemslots = 10,
    Pit2 = 33,
    SetIdentityMapAddr = 37,
    Ioeventfd = 36,
    Irqfd = 32,
    IrqRouting = 25,
    MaxVcpus = 66,
    TscDeadlineTimer = 72,
    ImmediateExit = 136,
    ManualDirtyLogProtect2 = 168,
    DirtyLogRing = 192,
    DirtyLogRingAcqRel = 223,
}
