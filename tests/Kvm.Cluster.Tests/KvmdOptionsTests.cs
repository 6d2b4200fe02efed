namespace Kvm.Cluster.Tests;

/// <summary>kvmd's settings are checked before it starts anything, each refusal naming the setting and its value.</summary>
public sealed class KvmdOptionsTests
{
    [Fact]
    public void The_defaults_pass_where_the_machine_has_a_usable_host_name()
    {
        var defaults = new KvmdOptions { HostName = "node-1.example" };
        defaults.Validate();
    }

    [Theory]
    [InlineData("(none)")] // what Linux reports when no host name was ever set
    [InlineData("")]
    [InlineData("-node")]
    [InlineData("node 1")]
    public void A_host_name_the_inventory_cannot_hold_is_refused_with_the_option_that_fixes_it(string name)
    {
        var e = Assert.Throws<ArgumentException>(() => new KvmdOptions { HostName = name }.Validate());
        Assert.Contains($"'{name}'", e.Message, StringComparison.Ordinal);
        Assert.Contains("--host-name", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void Lease_settings_that_leave_no_room_for_two_renewals_before_the_fence_are_refused()
    {
        var e = Assert.Throws<ArgumentException>(() => new KvmdOptions
        {
            HostName = "h",
            LeaseDuration = TimeSpan.FromSeconds(10),
            FenceMargin = TimeSpan.FromSeconds(3),
            LeaseRenewInterval = TimeSpan.FromSeconds(4),
        }.Validate());
        Assert.Contains("renew interval 4 s", e.Message, StringComparison.Ordinal);
    }
}
