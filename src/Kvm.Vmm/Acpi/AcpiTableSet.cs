namespace Kvm.Vmm.Acpi;

/// <summary>Where one table (or the RSDP, or the FACS) sits in guest-physical memory.</summary>
/// <param name="Signature">"RSDP" for the root pointer, otherwise the table's 4-character signature ("FACP" for the FADT, "APIC" for the MADT).</param>
public sealed record AcpiTableInfo(string Signature, ulong Address, int Length);

/// <summary>
/// ACPI tables laid out in one contiguous blob, to be copied to guest-physical <see cref="BaseAddress"/>.
/// Every pointer inside the blob is an absolute guest-physical address computed from that base.
/// </summary>
public sealed class AcpiTableSet
{
    internal AcpiTableSet(ulong baseAddress, byte[] bytes, ulong rsdpAddress, IReadOnlyList<AcpiTableInfo> tables)
    {
        BaseAddress = baseAddress;
        Bytes = bytes;
        RsdpAddress = rsdpAddress;
        Tables = tables;
    }

    /// <summary>Guest-physical address of <see cref="Bytes"/>[0].</summary>
    public ulong BaseAddress { get; }

    /// <summary>The blob: at most <see cref="AcpiTables.MaxSize"/> bytes.</summary>
    public byte[] Bytes { get; }

    /// <summary>
    /// Guest-physical address of the RSDP (the first bytes of the blob), for
    /// <c>hvm_start_info.rsdp_paddr</c> and <c>boot_params.acpi_rsdp_addr</c>.
    /// </summary>
    public ulong RsdpAddress { get; }

    /// <summary>Every structure in the blob in address order: RSDP, XSDT, FACP, FACS, APIC, [MCFG], DSDT.</summary>
    public IReadOnlyList<AcpiTableInfo> Tables { get; }

    /// <summary>The entry with <paramref name="signature"/>, or null.</summary>
    public AcpiTableInfo? Find(string signature) => Tables.FirstOrDefault(t => t.Signature == signature);

    /// <summary>The bytes of the structure <paramref name="signature"/>; throws when it is not in the set.</summary>
    public ReadOnlySpan<byte> Table(string signature)
    {
        AcpiTableInfo info = Find(signature) ?? throw new KeyNotFoundException($"no {signature} in the ACPI table set");
        return Bytes.AsSpan(checked((int)(info.Address - BaseAddress)), info.Length);
    }
}
