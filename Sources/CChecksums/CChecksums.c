#include "CChecksums.h"

#include <immintrin.h>

int cchecksums_cpu_supports_pclmul(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("pclmul") && __builtin_cpu_supports("sse4.1");
}

// Intel's "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ" (2009), folding four
// 128-bit lanes 64 bytes at a time, then to one lane, then Barrett reduction; the bit-reflected
// constants of zlib's polynomial are the ones Linux (crc32-pclmul) and Chromium's zlib use. Works on
// the CRC register (the CRC inverted).
__attribute__((target("pclmul,sse4.1"))) static uint32_t crc32_folded(uint32_t crc, const unsigned char *bytes, size_t count) {
    const __m128i k1k2 = _mm_set_epi64x(0x01c6e41596, 0x0154442bd4);
    const __m128i k3k4 = _mm_set_epi64x(0x00ccaa009e, 0x01751997d0);
    const __m128i k5k0 = _mm_set_epi64x(0, 0x0163cd6124);
    const __m128i polynomial = _mm_set_epi64x(0x01f7011641, 0x01db710641);
    const __m128i low32 = _mm_setr_epi32(~0, 0, ~0, 0);

    __m128i x1 = _mm_loadu_si128((const __m128i *)(bytes + 0x00));
    __m128i x2 = _mm_loadu_si128((const __m128i *)(bytes + 0x10));
    __m128i x3 = _mm_loadu_si128((const __m128i *)(bytes + 0x20));
    __m128i x4 = _mm_loadu_si128((const __m128i *)(bytes + 0x30));
    x1 = _mm_xor_si128(x1, _mm_cvtsi32_si128((int)crc));
    bytes += 64;
    count -= 64;

    while (count >= 64) {
        __m128i x5 = _mm_clmulepi64_si128(x1, k1k2, 0x00);
        __m128i x6 = _mm_clmulepi64_si128(x2, k1k2, 0x00);
        __m128i x7 = _mm_clmulepi64_si128(x3, k1k2, 0x00);
        __m128i x8 = _mm_clmulepi64_si128(x4, k1k2, 0x00);
        x1 = _mm_clmulepi64_si128(x1, k1k2, 0x11);
        x2 = _mm_clmulepi64_si128(x2, k1k2, 0x11);
        x3 = _mm_clmulepi64_si128(x3, k1k2, 0x11);
        x4 = _mm_clmulepi64_si128(x4, k1k2, 0x11);
        x1 = _mm_xor_si128(_mm_xor_si128(x1, x5), _mm_loadu_si128((const __m128i *)(bytes + 0x00)));
        x2 = _mm_xor_si128(_mm_xor_si128(x2, x6), _mm_loadu_si128((const __m128i *)(bytes + 0x10)));
        x3 = _mm_xor_si128(_mm_xor_si128(x3, x7), _mm_loadu_si128((const __m128i *)(bytes + 0x20)));
        x4 = _mm_xor_si128(_mm_xor_si128(x4, x8), _mm_loadu_si128((const __m128i *)(bytes + 0x30)));
        bytes += 64;
        count -= 64;
    }

    // Four lanes into one, then the remaining 16-byte blocks into it.
    const __m128i lanes[3] = {x2, x3, x4};
    for (int lane = 0; lane < 3; lane++) {
        __m128i low = _mm_clmulepi64_si128(x1, k3k4, 0x00);
        x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, k3k4, 0x11), lanes[lane]), low);
    }
    while (count >= 16) {
        __m128i low = _mm_clmulepi64_si128(x1, k3k4, 0x00);
        x1 = _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x1, k3k4, 0x11), _mm_loadu_si128((const __m128i *)bytes)), low);
        bytes += 16;
        count -= 16;
    }

    // 128 bits to 64, then Barrett reduction to 32.
    __m128i folded = _mm_xor_si128(_mm_srli_si128(x1, 8), _mm_clmulepi64_si128(x1, k3k4, 0x10));
    folded = _mm_xor_si128(_mm_clmulepi64_si128(_mm_and_si128(folded, low32), k5k0, 0x00), _mm_srli_si128(folded, 4));
    __m128i quotient = _mm_clmulepi64_si128(_mm_and_si128(folded, low32), polynomial, 0x10);
    __m128i product = _mm_clmulepi64_si128(_mm_and_si128(quotient, low32), polynomial, 0x00);
    return (uint32_t)_mm_extract_epi32(_mm_xor_si128(folded, product), 1);
}

uint32_t cchecksums_crc32_pclmul(uint32_t crc, const unsigned char *bytes, size_t count) { return ~crc32_folded(~crc, bytes, count); }
