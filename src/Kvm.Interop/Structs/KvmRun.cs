namespace Kvm.Interop.Structs;

/// <summary>
/// Offsets into struct kvm_run, the page shared between KVM and the vCPU thread. The page is read
/// through spans by these offsets rather than through a struct, so that exit decoding can be tested
/// on a plain byte array. A test checks each offset against the shim's offsetof.
/// </summary>
public static class KvmRunLayout
{
    public const int RequestInterruptWindow = 0;
    public const int ImmediateExit = 1;
    public const int ExitReason = 8;
    public const int ReadyForInterruptInjection = 12;
    public const int IfFlag = 13;
    public const int Flags = 14;
    public const int Cr8 = 16;
    public const int ApicBase = 24;

    /// <summary>Start of the exit-specific union.</summary>
    public const int Union = 32;

    public const int HwHardwareExitReason = Union;
    public const int FailEntryReason = Union;
    public const int FailEntryCpu = Union + 8;
    public const int ExException = Union;
    public const int ExErrorCode = Union + 4;

    public const int IoDirection = Union;
    public const int IoSize = Union + 1;
    public const int IoPort = Union + 2;
    public const int IoCount = Union + 4;
    public const int IoDataOffset = Union + 8;

    public const int MmioPhysAddr = Union;
    public const int MmioData = Union + 8;
    public const int MmioLen = Union + 16;
    public const int MmioIsWrite = Union + 20;

    public const int InternalSuberror = Union;
    public const int InternalNdata = Union + 4;
    public const int InternalData = Union + 8;
    public const int InternalMaxData = 16;

    public const int SystemEventType = Union;
    public const int SystemEventNdata = Union + 4;
    public const int SystemEventData = Union + 8;

    public const int KvmValidRegs = 288;
    public const int KvmDirtyRegs = 296;
    public const int SyncRegs = 304;

    /// <summary>sizeof(struct kvm_run) without the variable tail.</summary>
    public const int Size = 2352;
}

/// <summary>KVM_EXIT_* values of kvm_run.exit_reason.</summary>
public enum KvmExitReason : uint
{
    Unknown = 0,
    Exception = 1,
    Io = 2,
    Hypercall = 3,
    Debug = 4,
    Hlt = 5,
    Mmio = 6,
    IrqWindowOpen = 7,
    Shutdown = 8,
    FailEntry = 9,
    Intr = 10,
    SetTpr = 11,
    TprAccess = 12,
    Nmi = 16,
    InternalError = 17,
    SystemEvent = 24,
}

/// <summary>KVM_EXIT_IO_IN / KVM_EXIT_IO_OUT.</summary>
public static class KvmIoDirection
{
    public const byte In = 0;
    public const byte Out = 1;
}

/// <summary>KVM_INTERNAL_ERROR_* suberrors.</summary>
public enum KvmInternalError : uint
{
    Emulation = 1,
    SimulEx = 2,
    DeliveryEv = 3,
    UnexpectedExitReason = 4,
}

/// <summary>KVM_SYSTEM_EVENT_* types.</summary>
public enum KvmSystemEvent : uint
{
    Shutdown = 1,
    Reset = 2,
    Crash = 3,
    Wakeup = 4,
    Suspend = 5,
    Sev = 6,
}
