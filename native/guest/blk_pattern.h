/*
 * guestkit: the data pattern of blk-verify.  Tests regenerate it, so it is
 * part of the contract (README.md): for the 512-byte sector at LBA `lba`,
 * 64-bit little-endian word i (0..63) is
 *     mix64(((uint64_t)seed << 48) ^ (lba << 6) ^ i)
 * with mix64 the splitmix64 finaliser.
 */
#ifndef GUESTKIT_BLK_PATTERN_H
#define GUESTKIT_BLK_PATTERN_H

#include "guest.h"

#define PATTERN_WORDS_PER_SECTOR        64

static inline uint64_t mix64(uint64_t x)
{
    uint64_t z = x + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline uint64_t pattern_word(uint64_t seed, uint64_t lba, uint64_t i)
{
    return mix64((seed << 48) ^ (lba << 6) ^ i);
}

/* Fills sectors [lba, lba + n) into buf. */
static inline void pattern_fill(void *buf, uint64_t lba, uint64_t n, uint64_t seed)
{
    uint64_t *w = buf;

    for (uint64_t s = 0; s < n; s++)
        for (uint64_t i = 0; i < PATTERN_WORDS_PER_SECTOR; i++)
            *w++ = pattern_word(seed, lba + s, i);
}

/* Compares; on the first difference returns true with its place and values. */
static inline bool pattern_check(const void *buf, uint64_t lba, uint64_t n, uint64_t seed,
                                 uint64_t *bad_lba, uint64_t *bad_word,
                                 uint64_t *expected, uint64_t *got)
{
    const volatile uint64_t *w = buf;

    for (uint64_t s = 0; s < n; s++)
        for (uint64_t i = 0; i < PATTERN_WORDS_PER_SECTOR; i++) {
            uint64_t want = pattern_word(seed, lba + s, i);
            uint64_t have = w[s * PATTERN_WORDS_PER_SECTOR + i];
            if (have != want) {
                *bad_lba = lba + s;
                *bad_word = i;
                *expected = want;
                *got = have;
                return true;
            }
        }
    return false;
}

#endif
