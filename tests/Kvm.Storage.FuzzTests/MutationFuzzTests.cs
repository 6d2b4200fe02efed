using Xunit.Abstractions;

namespace Kvm.Storage.FuzzTests;

/// <summary>
/// Damaged copies of engine-made images, opened read-only: every case either works or ends in an
/// <see cref="ImageFormatException"/>, within 2 s and 64 MiB of allocation, leaving the files as they were.
/// </summary>
public sealed class EngineSeedFuzzTests(ITestOutputHelper output)
{
    public const int CasesPerSeed = 200;

    [Fact]
    public void ReadOnly_EngineSeeds()
    {
        var campaign = new FuzzCampaign("ro", nameof(EngineSeedFuzzTests) + "." + nameof(ReadOnly_EngineSeeds), output);
        foreach (var seed in Corpus.Engine)
            campaign.Run(seed, CasesPerSeed, readWrite: false);
        campaign.Finish();
    }
}

/// <summary>The same over images that qemu-img and qemu-io made (compressed clusters, internal snapshots, version 2, ...).</summary>
public sealed class QemuSeedFuzzTests(ITestOutputHelper output)
{
    public const int CasesPerSeed = 120;

    [SkippableFact]
    public void ReadOnly_QemuSeeds()
    {
        var seeds = Corpus.Qemu;
        var campaign = new FuzzCampaign("ro", nameof(QemuSeedFuzzTests) + "." + nameof(ReadOnly_QemuSeeds), output);
        foreach (var seed in seeds)
            campaign.Run(seed, seed.Name == "q2m" ? CasesPerSeed / 6 : CasesPerSeed, readWrite: false); // q2m: 12 MiB per case to write and hash
        campaign.Finish();
    }
}

/// <summary>
/// Damaged images opened read-write, with a few writes: a refused open changes nothing; an image
/// that checks free of corruption takes the writes, reads them back and still checks free of corruption.
/// </summary>
public sealed class ReadWriteFuzzTests(ITestOutputHelper output)
{
    public const int CasesPerSeed = 60;

    [Fact]
    public void ReadWrite_EngineSeeds()
    {
        var campaign = new FuzzCampaign("rw", nameof(ReadWriteFuzzTests) + "." + nameof(ReadWrite_EngineSeeds), output);
        foreach (var seed in Corpus.Engine)
            campaign.Run(seed, CasesPerSeed, readWrite: true);
        campaign.Finish();
    }

    [SkippableFact]
    public void ReadWrite_QemuSeeds()
    {
        var seeds = Corpus.Qemu;
        var campaign = new FuzzCampaign("rw", nameof(ReadWriteFuzzTests) + "." + nameof(ReadWrite_QemuSeeds), output);
        foreach (var seed in seeds)
            campaign.Run(seed, seed.Name == "q2m" ? CasesPerSeed / 6 : CasesPerSeed, readWrite: true);
        campaign.Finish();
    }

    /// <summary>
    /// qemu-img as the judge of the engine's writes: a damaged image that the engine's check and
    /// qemu-img check both find free of corruption must still pass qemu-img check after the writes.
    /// </summary>
    [SkippableFact]
    public void ReadWrite_QemuOracle()
    {
        Qemu.Require();
        var campaign = new FuzzCampaign("rwq", nameof(ReadWriteFuzzTests) + "." + nameof(ReadWrite_QemuOracle), output);
        foreach (var seed in Corpus.Engine.Concat(Corpus.Qemu))
            campaign.Run(seed, seed.Name == "q2m" ? 5 : 20, readWrite: true, qemuOracle: true);
        campaign.Finish();
    }
}
