using System.Diagnostics;
using System.Text.RegularExpressions;
using Kvm.Vmm.Acpi;

namespace Kvm.Vmm.Tests.Acpi;

/// <summary>
/// The tables checked by an independent decoder: ACPICA's <c>iasl -d</c> (Debian package
/// acpica-tools), which disassembles AML into ASL and data tables into annotated fields.
/// </summary>
public sealed class IaslOracleTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("kvm-acpi-").FullName;

    /// <summary>Keeps the .dat and .dsl files in $KVM_ACPI_KEEP when that is set (for reading iasl's view of the tables).</summary>
    public void Dispose()
    {
        if (Environment.GetEnvironmentVariable("KVM_ACPI_KEEP") is { Length: > 0 } keep)
        {
            Directory.CreateDirectory(keep);
            foreach (string file in Directory.EnumerateFiles(_dir))
                File.Copy(file, Path.Combine(keep, Path.GetFileName(file)), overwrite: true);
        }
        Directory.Delete(_dir, recursive: true);
    }

    private static string? IaslMissing()
    {
        foreach (string dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':', StringSplitOptions.RemoveEmptyEntries))
            if (File.Exists(Path.Combine(dir, "iasl")))
                return null;
        return "iasl is not installed (Debian package acpica-tools: apt-get install -y acpica-tools)";
    }

    private string Iasl(params string[] args)
    {
        var psi = new ProcessStartInfo("iasl") { WorkingDirectory = _dir, RedirectStandardOutput = true, RedirectStandardError = true };
        foreach (string a in args)
            psi.ArgumentList.Add(a);
        using var p = Process.Start(psi)!;
        Task<string> stdout = p.StandardOutput.ReadToEndAsync(), stderr = p.StandardError.ReadToEndAsync();
        Assert.True(p.WaitForExit(60_000), $"iasl {string.Join(' ', args)} did not finish in 60 s");
        string output = stdout.Result + stderr.Result;
        Assert.True(p.ExitCode == 0, $"iasl {string.Join(' ', args)} exited {p.ExitCode}:\n{output}");
        return output;
    }

    /// <summary>Disassembles one table with iasl -d and returns the .dsl text.</summary>
    private string Disassemble(AcpiTableSet set, string signature)
    {
        string name = signature.ToLowerInvariant();
        string input = Path.Combine(_dir, name + ".dat");
        File.WriteAllBytes(input, set.Table(signature).ToArray());
        string output = Iasl("-d", input);
        string dsl = Path.Combine(_dir, name + ".dsl");
        Assert.True(File.Exists(dsl), $"iasl -d wrote no {name}.dsl:\n{output}");
        return File.ReadAllText(dsl);
    }

    private static AcpiTableSet Set(int cpus = 2, ulong? ecam = 0xE000_0000) =>
        AcpiTables.Build(new AcpiConfig(cpus) { EcamBase = ecam }, 0xE0000);

    [SkippableFact]
    public void Dsdt_disassembles_to_the_host_bridge_com1_i8042_and_interrupt_links()
    {
        string? why = IaslMissing();
        Skip.If(why is not null, why);
        string dsl = Disassemble(Set(), "DSDT");

        Assert.Contains("Device (PCI0)", dsl);
        Assert.Contains("Name (_HID, EisaId (\"PNP0A08\")", dsl);
        Assert.Contains("Name (_CID, EisaId (\"PNP0A03\")", dsl);
        Assert.Matches(@"Name \(_SEG, Zero\)", dsl);
        Assert.Matches(@"Name \(_BBN, Zero\)", dsl);

        Assert.Contains("Device (COM1)", dsl);
        Assert.Contains("EisaId (\"PNP0501\")", dsl);
        Assert.Matches(@"IO \(Decode16,\s*0x03F8,\s*// Range Minimum\s*0x03F8,\s*// Range Maximum\s*0x01,\s*// Alignment\s*0x08,", dsl);
        Assert.Matches(@"IRQNoFlags \(\)\s*\{4\}", dsl);

        Assert.Contains("EisaId (\"PNP0303\")", dsl);
        Assert.Matches(@"IRQNoFlags \(\)\s*\{1\}", dsl);

        Assert.Contains("EisaId (\"PNP0C02\")", dsl);
        Assert.Matches(@"Memory32Fixed \(ReadWrite,\s*0xE0000000,\s*// Address Base\s*0x10000000,", dsl);

        for (int i = 0; i < 8; i++)
        {
            Assert.Contains($"Device (GSI{(char)('A' + i)})", dsl);
            Assert.Matches($@"Interrupt \(ResourceConsumer, Level, ActiveHigh, Shared, ,, \)\s*\{{\s*0x{16 + i:X8},\s*\}}", dsl);
        }
        Assert.Contains("EisaId (\"PNP0C0F\")", dsl);
        Assert.Contains("Method (_SRS, 1, NotSerialized)", dsl);
        Assert.DoesNotContain("Error", dsl, StringComparison.OrdinalIgnoreCase);
    }

    [SkippableFact]
    public void Dsdt_host_bridge_resources_hold_the_bus_range_config_ports_and_memory_window()
    {
        string? why = IaslMissing();
        Skip.If(why is not null, why);
        string dsl = Disassemble(Set(), "DSDT");

        Assert.Matches(@"WordBusNumber \(ResourceProducer, MinFixed, MaxFixed, PosDecode,\s*0x0000,\s*// Granularity\s*0x0000,\s*// Range Minimum\s*0x00FF,\s*// Range Maximum\s*0x0000,\s*// Translation Offset\s*0x0100,", dsl);
        Assert.Matches(@"IO \(Decode16,\s*0x0CF8,\s*// Range Minimum\s*0x0CF8,\s*// Range Maximum\s*0x01,\s*// Alignment\s*0x08,", dsl);
        Assert.Matches(@"WordIO \(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,\s*0x0000,\s*// Granularity\s*0x0000,\s*// Range Minimum\s*0x0CF7,", dsl);
        Assert.Matches(@"WordIO \(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange,\s*0x0000,\s*// Granularity\s*0x0D00,\s*// Range Minimum\s*0xFFFF,", dsl);
        Assert.Matches(@"DWordMemory \(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,\s*0x00000000,\s*// Granularity\s*0xC0000000,\s*// Range Minimum\s*0xDFFFFFFF,\s*// Range Maximum\s*0x00000000,\s*// Translation Offset\s*0x20000000,\s*// Length", dsl);
    }

    [SkippableFact]
    public void Dsdt_prt_routes_every_slot_and_pin_to_the_link_of_its_gsi()
    {
        string? why = IaslMissing();
        Skip.If(why is not null, why);
        string dsl = Disassemble(Set(), "DSDT");

        Assert.Contains("Name (_PRT, Package (0x80)", dsl);
        var entries = Regex.Matches(dsl, @"Package \(0x04\)\s*\{\s*(0x[0-9A-F]+|Zero|One),\s*(0x[0-9A-F]+|Zero|One),\s*\\_SB\.(GSI[A-H]),\s*Zero\s*\}");
        Assert.Equal(128, entries.Count);
        static ulong Value(string s) => s switch { "Zero" => 0, "One" => 1, _ => Convert.ToUInt64(s[2..], 16) };
        var seen = new HashSet<(int, int)>();
        foreach (Match m in entries)
        {
            ulong address = Value(m.Groups[1].Value);
            int pin = (int)Value(m.Groups[2].Value);
            Assert.Equal(0xFFFFUL, address & 0xFFFF);
            int slot = (int)(address >> 16);
            Assert.InRange(slot, 0, 31);
            Assert.InRange(pin, 0, 3);
            Assert.True(seen.Add((slot, pin)), $"slot {slot} pin {pin} routed twice");
            int gsi = 16 + m.Groups[3].Value[3] - 'A';
            Assert.Equal(AcpiConfig.PciGsi(slot, pin), gsi);
            if (pin == 0)
                Assert.Equal(16 + slot % 8, gsi);
        }
    }

    [SkippableTheory]
    [InlineData(1, null, null)]
    [InlineData(8, 0xE000_0000UL, null)]
    [InlineData(2, null, 0xF0000UL)]
    public void Dsdt_recompiled_by_iasl_without_optimizations_is_the_same_aml(int cpus, ulong? ecam, ulong? vmGenId)
    {
        string? why = IaslMissing();
        Skip.If(why is not null, why);
        var set = AcpiTables.Build(new AcpiConfig(cpus) { EcamBase = ecam, VmGenIdAddress = vmGenId }, 0xE0000);
        Disassemble(set, "DSDT");
        // -oa: no optimizations, so iasl emits the same encodings (full name paths, no integer folding).
        string output = Iasl("-oa", "-p", "again", "dsdt.dsl");
        Assert.Contains("0 Errors, 0 Warnings", output);
        byte[] again = File.ReadAllBytes(Path.Combine(_dir, "again.aml"));
        byte[] ours = set.Table("DSDT").ToArray();
        Assert.Equal(ours.Length, again.Length);
        Assert.True(ours.AsSpan(36).SequenceEqual(again.AsSpan(36)), "the AML after the header differs from iasl's compilation of its own disassembly");
    }

    [SkippableFact]
    public void Dsdt_has_the_vm_generation_id_device_and_the_gpe_method_that_notifies_it()
    {
        string? why = IaslMissing();
        Skip.If(why is not null, why);
        var set = AcpiTables.Build(new AcpiConfig(2) { VmGenIdAddress = 0x1_2345_6780 }, 0xE0000);
        string dsl = Disassemble(set, "DSDT");

        Assert.Contains("Device (VGEN)", dsl);
        Assert.Contains("Name (_HID, \"KVMC0001\")", dsl);
        Assert.Contains("Name (_CID, \"VM_Gen_Counter\")", dsl);
        // ADDR: the low and the high 32 bits of the id's address.
        Assert.Matches(@"Name \(ADDR, Package \(0x02\)[^\n]*\s*\{\s*0x23456780,\s*One\s*\}", dsl);
        Assert.Matches(@"Scope \(\\_GPE\)\s*\{\s*Method \(_E00, 0, NotSerialized\)[^\n]*\s*\{\s*Notify \(\\_SB\.VGEN, 0x80\)", dsl);
        Assert.DoesNotContain("Error", dsl, StringComparison.OrdinalIgnoreCase);

        string without = Disassemble(AcpiTables.Build(new AcpiConfig(2), 0xE0000), "DSDT");
        Assert.DoesNotContain("VGEN", without);
        Assert.DoesNotContain("_GPE", without);
    }

    [SkippableFact]
    public void Fadt_disassembles_with_the_gpe0_block()
    {
        string? why = IaslMissing();
        Skip.If(why is not null, why);
        string dsl = Disassemble(Set(), "FACP");
        Assert.Matches(@"GPE0 Block Address : 00000620", dsl);
        Assert.Matches(@"GPE0 Block Length : 04", dsl);
    }

    [SkippableFact]
    public void Dsdt_without_i8042_or_ecam_has_neither_device()
    {
        string? why = IaslMissing();
        Skip.If(why is not null, why);
        var set = AcpiTables.Build(new AcpiConfig(1) { I8042 = false }, 0xE0000);
        string dsl = Disassemble(set, "DSDT");
        Assert.DoesNotContain("PNP0303", dsl);
        Assert.DoesNotContain("PNP0C02", dsl);
        Assert.Contains("PNP0501", dsl);
    }

    [SkippableFact]
    public void Dsdt_names_s5_with_the_sleep_type_the_pm_device_powers_off_on_and_only_with_a_pm_block()
    {
        string? why = IaslMissing();
        Skip.If(why is not null, why);
        string dsl = Disassemble(Set(), "DSDT");
        // Name (\_S5, Package (0x04) { 0x05, 0x05, Zero, Zero })
        var m = System.Text.RegularExpressions.Regex.Match(dsl, @"Name \(\\_S5, Package \(0x04\)[^\n]*\s*\{\s*(\w+),\s*(\w+),\s*Zero,\s*Zero\s*\}");
        Assert.True(m.Success, dsl);
        Assert.Equal($"0x{Kvm.Devices.Legacy.AcpiPm.AcpiPmDevice.SleepTypeS5:X2}", m.Groups[1].Value);
        Assert.Equal(m.Groups[1].Value, m.Groups[2].Value);

        string without = Disassemble(AcpiTables.Build(new AcpiConfig(1) { PmIoBase = null }, 0xE0000), "DSDT");
        Assert.DoesNotContain("_S5", without);
    }

    [SkippableTheory]
    [InlineData("FACP")]
    [InlineData("APIC")]
    [InlineData("MCFG")]
    [InlineData("XSDT")]
    [InlineData("DSDT")]
    public void Iasl_finds_no_checksum_or_length_errors(string signature)
    {
        string? why = IaslMissing();
        Skip.If(why is not null, why);
        string dsl = Disassemble(Set(cpus: 8), signature);
        Assert.DoesNotContain("Incorrect checksum", dsl, StringComparison.OrdinalIgnoreCase);
        Assert.DoesNotContain("Invalid", dsl, StringComparison.OrdinalIgnoreCase);
        Assert.Matches(@"Oem ID\s*:\s*""KVMCS""|OEM ID\s*""KVMCS""|""KVMCS """, dsl);
    }

    [SkippableFact]
    public void Iasl_decodes_the_madt_for_8_vcpus()
    {
        string? why = IaslMissing();
        Skip.If(why is not null, why);
        string dsl = Disassemble(Set(cpus: 8), "APIC");
        Assert.Equal(8, Regex.Matches(dsl, @"Subtable Type : 00 \[Processor Local APIC\]").Count);
        for (int i = 0; i < 8; i++)
            Assert.Matches($@"Processor ID : {i:X2}\s*\[[^\]]*\]\s*Local Apic ID : {i:X2}", dsl);
        Assert.Matches(@"Subtable Type : 01 \[I/O APIC\]", dsl);
        Assert.Matches(@"Address : FEC00000", dsl);
        Assert.Equal(2, Regex.Matches(dsl, @"Subtable Type : 02 \[Interrupt Source Override\]").Count);
        Assert.Matches(@"Subtable Type : 04 \[Local APIC NMI\]", dsl);
    }

    [SkippableFact]
    public void Iasl_decodes_the_fadt_pointers_and_flags()
    {
        string? why = IaslMissing();
        Skip.If(why is not null, why);
        var set = Set();
        string dsl = Disassemble(set, "FACP");
        Assert.Matches(@"Revision : 06", dsl);
        Assert.Matches($@"DSDT Address : {set.Find("DSDT")!.Address:X8}", dsl);
        Assert.Matches($@"Address : {set.Find("DSDT")!.Address:X16}", dsl);
        Assert.Matches(@"SCI Interrupt : 0009", dsl);
        Assert.Matches(@"8042 Present on ports 60/64 \(V2\) : 1", dsl);
        Assert.Matches(@"VGA Not Present \(V4\) : 1", dsl);
        Assert.Matches(@"Hardware Reduced \(V5\) : 0", dsl);
    }
}
