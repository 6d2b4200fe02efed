using Kvm.Devices.Bus;
using Kvm.Devices.Manager;
using Kvm.Hypervisor.State;

namespace Kvm.Devices.Legacy.I8042;

/// <summary>
/// A stub of the PC's i8042 keyboard controller at ports 0x60 (data) and 0x64 (status/command),
/// with no keyboard or mouse behind it. It exists for its reset line: command 0xFE (pulse the
/// reset line), or clearing bit 0 of the output port with command 0xD1, resets the machine, which
/// is how Linux reboots with reboot=k. The callback gets the id of the vCPU that asked. It answers the self-tests and keeps the command byte so a
/// probing driver finds a controller that works and has no devices. Register two
/// <see cref="Port"/> adapters: <see cref="DataPort"/> and <see cref="CommandPort"/>.
/// </summary>
public sealed class I8042Controller(Action<int> onReset) : IStatefulDevice
{
    public const ushort DataPortAddress = 0x60, CommandPortAddress = 0x64;

    private const byte StatusOutputFull = 0x01, StatusSystemFlag = 0x04, StatusCommand = 0x08;
    private const byte CmdReadCommandByte = 0x20, CmdWriteCommandByte = 0x60, CmdSelfTest = 0xaa,
        CmdInterfaceTest = 0xab, CmdAuxInterfaceTest = 0xa9, CmdWriteOutputPort = 0xd1, CmdPulseReset = 0xfe,
        CmdReadOutputPort = 0xd0;

    private readonly object _lock = new();
    private byte _commandByte = 0x45;      // translate, system flag, keyboard interrupt (as firmware leaves it)
    private byte _status = StatusSystemFlag;
    private byte _output;
    private byte _pendingCommand;          // a command waiting for its data byte on port 0x60

    public IBusDevice DataPort => new Port(this, data: true);
    public IBusDevice CommandPort => new Port(this, data: false);

    /// <summary>How many times the guest asked for a reset.</summary>
    public int Resets { get; private set; }

    private byte ReadData()
    {
        lock (_lock)
        {
            _status &= unchecked((byte)~StatusOutputFull);
            return _output;
        }
    }

    private byte ReadStatus()
    {
        lock (_lock)
            return _status;
    }

    private void WriteCommand(byte command, int vcpuId)
    {
        bool reset = false;
        lock (_lock)
        {
            _status |= StatusCommand;
            switch (command)
            {
                case CmdReadCommandByte: Respond(_commandByte); break;
                case CmdWriteCommandByte or CmdWriteOutputPort: _pendingCommand = command; break;
                case CmdSelfTest: Respond(0x55); break;
                case CmdInterfaceTest or CmdAuxInterfaceTest: Respond(0x00); break;
                case CmdReadOutputPort: Respond(0x01); break;   // reset line released (bit 0 set)
                case CmdPulseReset: reset = true; break;
                default:
                    // 0xF0-0xFF pulse output lines: only bit 0 (reset) matters; others are ignored.
                    reset = command >= 0xf0 && (command & 1) == 0;
                    break;
            }
            if (reset)
                Resets++;
        }
        if (reset)
            onReset(vcpuId);
    }

    private void WriteData(byte value, int vcpuId)
    {
        bool reset = false;
        lock (_lock)
        {
            _status &= unchecked((byte)~StatusCommand);
            switch (_pendingCommand)
            {
                case CmdWriteCommandByte:
                    _commandByte = value;
                    break;
                case CmdWriteOutputPort when (value & 1) == 0:
                    reset = true;
                    Resets++;
                    break;
            }
            _pendingCommand = 0;
            // Bytes for a keyboard that is not there: no reply.
        }
        if (reset)
            onReset(vcpuId);
    }

    private void Respond(byte value)
    {
        _output = value;
        _status |= StatusOutputFull;
    }

    public string StateKind => "i8042";

    public I8042State Save()
    {
        lock (_lock)
            return new I8042State(_commandByte, _status, _output, _pendingCommand);
    }

    public void Restore(I8042State state)
    {
        lock (_lock)
            (_commandByte, _status, _output, _pendingCommand) = (state.CommandByte, state.Status, state.Output, state.PendingCommand);
    }

    public void SaveState(StateWriter writer) => Save().Write(writer);

    public void RestoreState(ref StateReader reader) => Restore(I8042State.Read(ref reader));

    private sealed class Port(I8042Controller controller, bool data) : IBusDevice
    {
        public void Read(ulong offset, Span<byte> bytes, int vcpuId)
        {
            bytes.Fill(0xff);
            if (bytes.Length == 1)
                bytes[0] = data ? controller.ReadData() : controller.ReadStatus();
        }

        public void Write(ulong offset, ReadOnlySpan<byte> bytes, int vcpuId)
        {
            if (bytes.Length != 1)
                return;
            if (data)
                controller.WriteData(bytes[0], vcpuId);
            else
                controller.WriteCommand(bytes[0], vcpuId);
        }
    }
}

/// <summary>The state of an <see cref="I8042Controller"/>: command byte, status, output buffer and a command awaiting its data.</summary>
public sealed record I8042State(byte CommandByte, byte Status, byte Output, byte PendingCommand)
{
    public void Write(StateWriter w) => w.U8(CommandByte).U8(Status).U8(Output).U8(PendingCommand);

    public static I8042State Read(ref StateReader r) =>
        new(r.U8("command_byte"), r.U8("status"), r.U8("output"), r.U8("pending_command"));
}
