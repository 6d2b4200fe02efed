using Kvm.Devices.Virtio;
using Kvm.Hypervisor;
using static Kvm.Devices.Tests.SplitQueue;

namespace Kvm.Devices.Tests;

/// <summary>The device side of a split virtqueue (virtio 1.2, 2.7), used directly on guest memory.</summary>
public sealed class VirtqueueTests : IDisposable
{
    private const ulong Ram = 1 << 20;
    private const ushort Size = 8;
    private const ulong RingAt = 0x1000;
    private readonly GuestMemory _mem = GuestMemory.Create([(0, Ram)]);
    private readonly SplitQueue _driver;
    private readonly Virtqueue _vq = new(0, 16);

    public VirtqueueTests()
    {
        _driver = new SplitQueue(_mem, Size, RingAt);
        _driver.Clear();
        _vq.Size = Size;
        _vq.DescTable = _driver.Desc;
        _vq.AvailRing = _driver.Avail;
        _vq.UsedRing = _driver.Used;
    }

    public void Dispose() => _mem.Dispose();

    private void Activate(bool eventIdx = false, bool indirect = true) => _vq.Activate(_mem, eventIdx, indirect);

    private void Desc(int i, ulong addr, uint len, ushort flags = 0, ushort next = 0) => _driver.WriteDescriptor(i, addr, len, flags, next);

    private VirtqueueException PopFails()
    {
        var e = Assert.Throws<VirtqueueException>(() => _vq.TryPop(out _));
        Assert.Contains("queue 0", e.Message);
        return e;
    }

    [Theory]
    [InlineData(0)]
    [InlineData(3)]
    [InlineData(65535)]
    public void MaxSize_MustBeAPowerOfTwoUpTo32768(int size) =>
        Assert.Throws<ArgumentOutOfRangeException>(() => new Virtqueue(0, (ushort)size));

    [Theory]
    [InlineData((ushort)0, "size")]
    [InlineData((ushort)12, "size")]
    [InlineData((ushort)32, "size")]      // above the maximum, 16
    public void Activate_RefusesABadSize(ushort size, string word)
    {
        _vq.Size = size;
        var e = Assert.Throws<VirtqueueException>(() => Activate());
        Assert.Contains(word, e.Message);
        Assert.False(_vq.IsActive);
    }

    [Theory]
    [InlineData("desc", 0x1008UL, "descriptor table")]     // 16-byte alignment
    [InlineData("avail", 0x1801UL, "available ring")]       // 2-byte alignment
    [InlineData("used", 0x3002UL, "used ring")]             // 4-byte alignment
    [InlineData("desc", Ram, "descriptor table")]          // outside RAM
    [InlineData("desc", Ram - 64, "descriptor table")]     // runs past the end of RAM
    [InlineData("avail", Ram - 16, "available ring")]      // the used_event field would be outside
    [InlineData("used", Ram - 64, "used ring")]            // the avail_event field would be outside
    [InlineData("used", 0xffff_ffff_ffff_fff0UL, "used ring")]
    public void Activate_RefusesMisalignedOrOutsideRings_NamingTheRing(string ring, ulong address, string name)
    {
        switch (ring)
        {
            case "desc": _vq.DescTable = address; break;
            case "avail": _vq.AvailRing = address; break;
            default: _vq.UsedRing = address; break;
        }
        var e = Assert.Throws<VirtqueueException>(() => Activate());
        Assert.Contains(name, e.Message);
        Assert.False(_vq.IsActive);
    }

    [Fact]
    public void TryPop_FlattensAChain_ReadableFirst_SkippingEmptyBuffers()
    {
        Activate();
        Assert.False(_vq.TryPop(out _));
        Desc(3, 0x10000, 16, Next, 5);
        Desc(5, 0x10100, 0, Next, 1);            // empty: carries nothing
        Desc(1, 0x10200, 512, Next, 0);
        Desc(0, 0x10400, 512, Write | Next, 7);
        Desc(7, 0x10800, 1, Write);
        _driver.Publish(3);
        Assert.Equal(1, _vq.Pending);
        Assert.True(_vq.TryPop(out var c));
        Assert.Equal(3, c.Head);
        Assert.Equal(
            [new ChainSegment(0x10000, 16, false), new ChainSegment(0x10200, 512, false), new ChainSegment(0x10400, 512, true), new ChainSegment(0x10800, 1, true)],
            c.Segments.ToArray());
        Assert.Equal(2, c.FirstWritable);
        Assert.Equal(528UL, c.ReadableBytes);
        Assert.Equal(513UL, c.WritableBytes);
        Assert.False(_vq.TryPop(out _));
    }

    [Fact]
    public void TryPop_FollowsAnIndirectTable_AndIgnoresWriteOnTheIndirectDescriptor()
    {
        Activate(indirect: true);
        const ulong table = 0x20000;
        _driver.WriteDescriptorAt(table, 0x30000, 16, Next, 2);
        _driver.WriteDescriptorAt(table + 16, 0xdead_0000_0000, 1, Write, 0);   // not in the chain
        _driver.WriteDescriptorAt(table + 32, 0x30100, 8, Write, 0);
        Desc(0, table, 48, Indirect | Write);
        _driver.Publish(0);
        Assert.True(_vq.TryPop(out var c));
        Assert.Equal([new ChainSegment(0x30000, 16, false), new ChainSegment(0x30100, 8, true)], c.Segments.ToArray());
    }

    [Fact]
    public void Chains_AsLongAsTheQueue_AreAccepted_DirectOrIndirect()
    {
        Activate();
        for (int i = 0; i < Size; i++)
            Desc(i, 0x10000 + (ulong)i * 0x100, 16, (ushort)(i < Size - 1 ? Next : 0), (ushort)(i + 1));
        _driver.Publish(0);
        Assert.True(_vq.TryPop(out var c));
        Assert.Equal(Size, c.Count);

        const ulong table = 0x20000;
        for (int i = 0; i < Size; i++)
            _driver.WriteDescriptorAt(table + 16UL * (uint)i, 0x10000, 16, (ushort)(i < Size - 1 ? Next : 0), (ushort)(i + 1));
        Desc(0, table, 16 * Size, Indirect);
        _driver.Publish(0);
        Assert.True(_vq.TryPop(out c));
        Assert.Equal(Size, c.Count);
    }

    [Fact]
    public void Loop_IsCaughtByTheQueueSizeBudget()
    {
        Activate();
        Desc(0, 0x10000, 16, Next, 1);
        Desc(1, 0x10000, 16, Next, 2);
        Desc(2, 0x10000, 16, Next, 0);
        _driver.Publish(0);
        Assert.Contains("longer than the queue size", PopFails().Message);
    }

    [Fact]
    public void LoopInsideAnIndirectTable_IsCaught()
    {
        Activate();
        const ulong table = 0x20000;
        _driver.WriteDescriptorAt(table, 0x10000, 16, Next, 1);
        _driver.WriteDescriptorAt(table + 16, 0x10000, 16, Next, 0);
        Desc(0, table, 32, Indirect);
        _driver.Publish(0);
        PopFails();
    }

    [Theory]
    [InlineData((ushort)Size)]
    [InlineData((ushort)0xffff)]
    public void NextOutOfRange_IsRefused(ushort next)
    {
        Activate();
        Desc(0, 0x10000, 16, Next, next);
        _driver.Publish(0);
        Assert.Contains("next", PopFails().Message);
    }

    [Fact]
    public void HeadOutOfRange_IsRefused()
    {
        Activate();
        _driver.WriteAvailSlot(0, Size);
        _driver.SetAvailIdx(1);
        PopFails();
    }

    [Theory]
    [InlineData(Ram, 1u)]                       // just past the end
    [InlineData(Ram - 8, 16u)]                  // straddles the end
    [InlineData(0xffff_ffff_ffff_fff0UL, 0x20u)] // wraps around the address space
    [InlineData(0UL, 0xffff_ffffu)]             // longer than RAM
    public void Buffers_OutsideGuestRam_AreRefused(ulong address, uint length)
    {
        Activate();
        Desc(0, 0x10000, 16, Next, 1);
        Desc(1, address, length, Write);
        _driver.Publish(0);
        PopFails();
    }

    [Fact]
    public void ReadableAfterWritable_IsRefused()
    {
        Activate();
        Desc(0, 0x10000, 16, Next, 1);
        Desc(1, 0x10100, 16, Write | Next, 2);
        Desc(2, 0x10200, 16);
        _driver.Publish(0);
        Assert.Contains("follows a device-writable", PopFails().Message);
    }

    [Fact]
    public void ReadableAfterWritable_AcrossTheIndirectTable_IsRefused()
    {
        Activate();
        const ulong table = 0x20000;
        _driver.WriteDescriptorAt(table, 0x10000, 16, Write | Next, 1);
        _driver.WriteDescriptorAt(table + 16, 0x10100, 16, 0, 0);
        Desc(0, table, 32, Indirect);
        _driver.Publish(0);
        PopFails();
    }

    [Fact]
    public void Indirect_WithoutNegotiation_IsRefused()
    {
        Activate(indirect: false);
        _driver.WriteDescriptorAt(0x20000, 0x10000, 16, 0, 0);
        Desc(0, 0x20000, 16, Indirect);
        _driver.Publish(0);
        Assert.Contains("INDIRECT_DESC", PopFails().Message);
    }

    [Fact]
    public void NestedIndirect_IsRefused()
    {
        Activate();
        _driver.WriteDescriptorAt(0x20000, 0x21000, 16, Indirect, 0);
        _driver.WriteDescriptorAt(0x21000, 0x10000, 16, 0, 0);
        Desc(0, 0x20000, 16, Indirect);
        _driver.Publish(0);
        Assert.Contains("nesting", PopFails().Message);
    }

    [Fact]
    public void IndirectWithNext_IsRefused()
    {
        Activate();
        _driver.WriteDescriptorAt(0x20000, 0x10000, 16, 0, 0);
        Desc(0, 0x20000, 16, Indirect | Next, 1);
        Desc(1, 0x10000, 1, Write);
        _driver.Publish(0);
        PopFails();
    }

    [Theory]
    [InlineData(0u)]
    [InlineData(17u)]
    [InlineData(8u)]
    [InlineData(16u * (Size + 1))]          // longer than the queue
    [InlineData(0xffff_fff0u)]
    public void IndirectTable_WithABadLength_IsRefused(uint length)
    {
        Activate();
        Desc(0, 0x20000, length, Indirect);
        _driver.Publish(0);
        PopFails();
    }

    [Theory]
    [InlineData(Ram - 16, 32u)]
    [InlineData(0xffff_ffff_ffff_fff0UL, 32u)]
    public void IndirectTable_OutsideGuestRam_IsRefused(ulong address, uint length)
    {
        Activate();
        Desc(0, address, length, Indirect);
        _driver.Publish(0);
        PopFails();
    }

    [Fact]
    public void IndirectNext_BeyondTheTable_IsRefused()
    {
        Activate();
        _driver.WriteDescriptorAt(0x20000, 0x10000, 16, Next, 2);    // a 2-entry table
        _driver.WriteDescriptorAt(0x20010, 0x10000, 16, 0, 0);
        _driver.WriteDescriptorAt(0x20020, 0x10000, 16, 0, 0);       // beyond it, though in RAM
        Desc(0, 0x20000, 32, Indirect);
        _driver.Publish(0);
        PopFails();
    }

    [Theory]
    [InlineData((ushort)(Size + 1))]
    [InlineData((ushort)0xffff)]
    [InlineData((ushort)0x8000)]
    public void AvailIndex_MoreThanTheQueueSizeAhead_IsRefused(ushort idx)
    {
        Activate();
        _driver.SetAvailIdx(idx);
        Assert.Contains("available index", Assert.Throws<VirtqueueException>(() => _vq.Pending).Message);
        PopFails();
    }

    [Fact]
    public void PushAndPop_WrapAroundTheRings_AndThe16BitIndices()
    {
        Activate();
        Desc(0, 0x10000, 16, Next, 1);
        Desc(1, 0x10100, 4, Write);
        for (int i = 0; i < 70_000; i++)
        {
            _driver.Publish(0);
            Assert.True(_vq.TryPop(out var c));
            Assert.Equal(0, c.Head);
            _vq.Push(c.Head, (uint)i);
            Assert.Equal((ushort)(i + 1), _driver.UsedIdx);
            Assert.Equal((0u, (uint)i), _driver.ReadUsedElement((ushort)i));
        }
        Assert.Equal(0, _vq.Pending);
    }

    [Fact]
    public void ShouldInterrupt_WithoutEventIdx_OncePerBatch_UnlessNoInterrupt()
    {
        Activate(eventIdx: false);
        Desc(0, 0x10000, 16);
        _driver.Publish(0);
        _vq.TryPop(out _);
        _vq.Push(0, 0);
        Assert.True(_vq.ShouldInterrupt());
        Assert.False(_vq.ShouldInterrupt());        // nothing new since

        _driver.AvailFlags = AvailNoInterrupt;
        _driver.Publish(0);
        _vq.TryPop(out _);
        _vq.Push(0, 0);
        Assert.False(_vq.ShouldInterrupt());
        _driver.AvailFlags = 0;
        Assert.False(_vq.ShouldInterrupt());        // that buffer's interrupt was declined, not postponed
    }

    [Fact]
    public void ShouldInterrupt_WithEventIdx_WhenUsedEventIsPassed()
    {
        Activate(eventIdx: true);
        Desc(0, 0x10000, 16);
        void OneMore()
        {
            _driver.Publish(0);
            Assert.True(_vq.TryPop(out _));
            _vq.Push(0, 0);
        }
        OneMore();                                   // used 0 -> 1; used_event 0 is passed
        Assert.True(_vq.ShouldInterrupt());
        _driver.UsedEvent = 3;
        OneMore();                                   // 1 -> 2
        Assert.False(_vq.ShouldInterrupt());
        OneMore();                                   // 2 -> 3
        Assert.False(_vq.ShouldInterrupt());
        OneMore();                                   // 3 -> 4: entry 3 is used, passing used_event 3
        Assert.True(_vq.ShouldInterrupt());
        _driver.UsedEvent = 5;
        OneMore();
        OneMore();
        OneMore();                                   // 4 -> 7 in one batch passes 5
        Assert.True(_vq.ShouldInterrupt());
        _driver.AvailFlags = AvailNoInterrupt;       // ignored with EVENT_IDX
        _driver.UsedEvent = 7;
        OneMore();
        Assert.True(_vq.ShouldInterrupt());
    }

    [Fact]
    public void EnableNotifications_PublishesAvailEvent_AndReportsChainsThatArrivedMeanwhile()
    {
        Activate(eventIdx: true);
        Desc(0, 0x10000, 16);
        _driver.Publish(0);
        _driver.Publish(0);
        Assert.True(_vq.TryPop(out _));
        Assert.False(_vq.EnableNotifications());     // one more is waiting
        Assert.Equal(1, _driver.AvailEvent);
        Assert.True(_vq.TryPop(out _));
        Assert.True(_vq.EnableNotifications());
        Assert.Equal(2, _driver.AvailEvent);
    }

    [Fact]
    public void Reset_ForgetsTheRings()
    {
        Activate();
        _vq.MsixVector = 3;
        _vq.Enabled = true;
        _vq.Reset();
        Assert.False(_vq.IsActive);
        Assert.False(_vq.Enabled);
        Assert.Equal(16, _vq.Size);
        Assert.Equal(Virtqueue.NoVector, _vq.MsixVector);
        Assert.Equal(0UL, _vq.DescTable | _vq.AvailRing | _vq.UsedRing);
    }
}
