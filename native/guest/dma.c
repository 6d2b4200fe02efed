/*
 * guestkit: guest RAM above the image, from the PVH memory map.
 *
 * The area starts at the first 2 MiB boundary at or above the end of the
 * image (wl_dirty writes there too).  dma_alloc() hands out zeroed, 4 KiB
 * aligned pieces of it for virtqueue rings and request buffers; devices
 * reach them by their guest-physical address, which equals the virtual one
 * (identity map).
 */
#include "guest.h"

uint64_t ram_area_base(void)
{
    return ((uint64_t)(uintptr_t)__image_end + HUGE_PAGE_SIZE - 1) & ~(HUGE_PAGE_SIZE - 1);
}

/* End of the RAM entry of the memmap that holds base, 0 if none (capped at 4 GiB). */
static uint64_t ram_end_at(uint64_t base)
{
    const struct hvm_start_info *si = start_info;
    uint64_t best = 0;

    if (!si || si->version < 1 || !si->memmap_paddr || si->memmap_paddr >= FOUR_GIB)
        return 0;
    const struct hvm_memmap_table_entry *map = (const void *)(uintptr_t)si->memmap_paddr;
    for (uint32_t i = 0; i < si->memmap_entries; i++) {
        uint64_t a = map[i].addr, s = map[i].size;
        if (map[i].type != HVM_MEMMAP_TYPE_RAM || a + s < a)
            continue;
        if (a <= base && base < a + s && a + s > best)
            best = a + s;
    }
    return best > FOUR_GIB ? FOUR_GIB : best;
}

bool ram_area_fits(uint64_t base, uint64_t size)
{
    uint64_t end = base + size;

    return end >= base && end <= FOUR_GIB && end <= ram_end_at(base);
}

static uint64_t dma_next, dma_end;

static void dma_setup(void)
{
    if (dma_end)
        return;
    dma_next = ram_area_base();
    dma_end = ram_end_at(dma_next);
    if (!dma_end)
        gk_usage_error("no RAM above the image (at 0x%lx) in the PVH memory map", dma_next);
}

void *dma_alloc(uint64_t size)
{
    dma_setup();
    size = (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
    if (size > dma_end - dma_next)
        gk_usage_error("out of guest RAM for buffers: %lu bytes more needed at 0x%lx, "
                       "RAM ends at 0x%lx", size, dma_next, dma_end);
    void *p = (void *)(uintptr_t)dma_next;
    dma_next += size;
    memset(p, 0, size);
    return p;
}

uint64_t dma_mark(void)
{
    dma_setup();
    return dma_next;
}

void dma_release(uint64_t mark)
{
    if (mark >= ram_area_base() && mark <= dma_next)
        dma_next = mark;
}
