using Kvm.Network;

namespace Kvm.Network.Tests;

public class TokenBucketTests
{
    // A slow rate (1 kB/s), so that the time the test itself takes (milliseconds, more on a loaded
    // machine) changes the waits by a thousandth of what they are.

    [Fact]
    public void AFrameGoesWhileTheBucketIsNotInDebtAndTheNextWaitsTheDebtOut()
    {
        var bucket = new TokenBucket(8_000);
        Assert.Equal(1_000, bucket.BytesPerSecond);
        Assert.Equal(VirtioNetHeader.MaxPacket, bucket.Burst);  // 5 ms is less than one largest frame
        Assert.False(bucket.InDebt);
        Assert.Equal(TimeSpan.Zero, bucket.TryTake(200_000));   // full: it goes, leaving a debt of ~134 kB
        Assert.True(bucket.InDebt);
        var wait = bucket.TryTake(1);
        double debt = (200_000 - VirtioNetHeader.MaxPacket) / 1e3;
        Assert.InRange(wait.TotalSeconds, debt - 10, debt);
        // Waiting takes nothing.
        Assert.InRange(bucket.TryTake(1).TotalSeconds, debt - 10, wait.TotalSeconds);
    }

    [Fact]
    public void ChargingPutsTheBucketInDebtWhateverItHeld()
    {
        var bucket = new TokenBucket(8_000);
        bucket.Charge(VirtioNetHeader.MaxPacket + 500_000);
        Assert.InRange(bucket.TryTake(0).TotalSeconds, 490, 500);
    }

    /// <summary>
    /// A sender waiting out a debt reckoned at a low rate goes as soon as the rate is raised (a
    /// bandwidth group gives a member its share back), not after the old wait: here the debt is
    /// 500 s at 8 kbit/s and 4 ms at 1 Gbit/s.
    /// </summary>
    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public void ARaisedRateEndsAWaitReckonedAtTheOldRate(bool receiving)
    {
        var bucket = new TokenBucket(8_000);
        bucket.Charge(VirtioNetHeader.MaxPacket + 500_000);
        var waiter = new Thread(() =>
        {
            if (receiving)
                bucket.WaitOutOfDebt();
            else
                bucket.Take(1500);
        }) { IsBackground = true };
        waiter.Start();
        Assert.False(waiter.Join(TimeSpan.FromMilliseconds(200)), "the sender went while the bucket was 500 s in debt");
        bucket.SetRate(1_000_000_000);
        Assert.True(waiter.Join(TimeSpan.FromSeconds(30)), "the sender still waits after the rate went up");
        Assert.Equal(1, bucket.Held);
    }

    [Theory]
    [InlineData("10M", 10_000_000)]
    [InlineData("1.5G", 1_500_000_000)]
    [InlineData("800K", 800_000)]
    [InlineData("64000", 64_000)]
    [InlineData("100Mbit", 100_000_000)]
    public void RatesParseInDecimalUnits(string text, long bits) => Assert.Equal(bits, TokenBucket.ParseRate(text));

    [Theory]
    [InlineData("")]
    [InlineData("fast")]
    [InlineData("0")]
    [InlineData("-5M")]
    [InlineData("10X")]
    public void BadRatesAreRefusedNamingTheText(string text)
    {
        var e = Assert.Throws<FormatException>(() => TokenBucket.ParseRate(text));
        Assert.Contains($"'{text}'", e.Message);
    }

    [Fact]
    public void ARateMustBePositive() => Assert.Throws<ArgumentOutOfRangeException>(() => new TokenBucket(0));
}
